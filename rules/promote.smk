rule promote:
    input:
        "results/{family}/sensitivity.parquet",
    output:
        "results/{family}/plan.parquet",
    params:
        budget_bpw=config["budget_bpw"],
        tie_groups=config["tie_groups"],
    conda:
        "../envs/sopq.yaml"
    log:
        "logs/{family}/promote.log",
    benchmark:
        "benchmarks/{family}/promote.tsv"
    script:
        "../workflow/scripts/promote.py"
