rule kernel:
    input:
        "results/{family}/packed",
    output:
        "results/{family}/kernel.parquet",
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
