rule kernel:
    input:
        "results/{family}/packed",
    output:
        report("results/{family}/kernel.parquet", caption="../workflow/report/kernel.rst", category="{family}"),
    params:
        m=config["kernel"]["m"],
        seed=config["seed"],
    # One thread: the Triton interpreter runs in Python, and a GPU needs no CPU threads; so the
    # kernel check runs beside other jobs.
    threads: 1
    # One GPU where the executor has them (SLURM profile, or --resources gpu=N locally): the
    # script runs the kernel there and records timings; without one it runs in the Triton
    # interpreter and records errors only.
    resources:
        mem_mb=4000,
        gpu=1,
    conda:
        "../envs/sopq.yaml"
    log:
        "logs/{family}/kernel.log",
    benchmark:
        "benchmarks/{family}/kernel.tsv"
    script:
        "../workflow/scripts/kernel.py"
