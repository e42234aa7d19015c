rule promote:
    input:
        "results/{family}/sensitivity.parquet",
    output:
        report("results/{family}/plan.parquet", caption="../workflow/report/plan.rst", category="{family}"),
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
