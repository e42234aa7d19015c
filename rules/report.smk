def per_family(pattern):
    return expand(pattern, family=FAMILIES)


# Every per-stage benchmark file, so the report's provenance shows the run times.
FAMILY_STAGES = ["fetch_model", "calibrate", "importance", "sensitivity", "promote", "sweep", "fit", "pack", "kernel", "evaluate"]


rule report:
    input:
        eval=per_family("results/{family}/eval.parquet"),
        eval_layers=per_family("results/{family}/eval_layers.parquet"),
        plan=per_family("results/{family}/plan.parquet"),
        sensitivity=per_family("results/{family}/sensitivity.parquet"),
        kernel=per_family("results/{family}/kernel.parquet"),
        pareto=per_family("results/{family}/pareto.parquet"),
        benchmarks=expand("benchmarks/{family}/{stage}.tsv", family=FAMILIES, stage=FAMILY_STAGES)
        + ["benchmarks/fetch_text.tsv"]
        + [f for fam in FAMILIES for f in expand("benchmarks/{family}/sensitivity_shard{shard}.tsv", family=fam, shard=range(n_shards(fam)))],
    output:
        report("results/report.html", caption="../workflow/report/report.rst", category="Report"),
    params:
        families=FAMILIES,
        config=config,
    conda:
        "../envs/sopq.yaml"
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report.tsv"
    script:
        "../workflow/scripts/report.py"
