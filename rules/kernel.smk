rule kernel:
    input:
        "results/{family}/packed",
    output:
        report("results/{family}/kernel.parquet", caption="../workflow/report/kernel.rst", category="{family}"),
    params:
        m=config["kernel"]["m"],
        seed=config["seed"],
    threads: workflow.cores
    resources:
        mem_mb=4000,
    conda:
        "../envs/sopq.yaml"
    log:
        "logs/{family}/kernel.log",
    benchmark:
        "benchmarks/{family}/kernel.tsv"
    script:
        "../workflow/scripts/kernel.py"
