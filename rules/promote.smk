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


# Promotion at every budget of the sweep: the Pareto frontier of predicted error against bits,
# and the plans themselves (the evaluate stage measures those in sweep.evaluate end to end).
rule sweep:
    input:
        "results/{family}/sensitivity.parquet",
    output:
        pareto="results/{family}/pareto.parquet",
        plans="results/{family}/sweep_plans.parquet",
    params:
        budgets=config["sweep"]["budgets"],
        tie_groups=config["tie_groups"],
    conda:
        "../envs/sopq.yaml"
    log:
        "logs/{family}/sweep.log",
    benchmark:
        "benchmarks/{family}/sweep.tsv"
    script:
        "../workflow/scripts/sweep.py"
