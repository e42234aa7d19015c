rule evaluate:
    input:
        model="resources/models/{family}",
        text="resources/text/eval.txt",
        packed="results/{family}/packed",
        stats="results/{family}/calib/stats.parquet",
        grams="results/{family}/calib/grams.safetensors",
        fits="results/{family}/fits",
        sensitivity="results/{family}/sensitivity.parquet",
        sweep_plans="results/{family}/sweep_plans.parquet",
    output:
        summary=report("results/{family}/eval.parquet", caption="../workflow/report/eval.rst", category="{family}"),
        layers="results/{family}/eval_layers.parquet",
    params:
        **MODEL_PARAMS,
        quantization=config["quantization"],
        evaluate_budgets=config["sweep"]["evaluate"],
        budget_bpw=config["budget_bpw"],
        comparisons=config["comparisons"],
        evaluation=config["evaluation"],
    # One single-threaded worker process per thread, each running the reference and a share of
    # the variants block by block (memory: one block and the head's outputs per worker).
    threads: workflow.cores
    resources:
        mem_mb=12000,
    conda:
        "../envs/sopq.yaml"
    log:
        "logs/{family}/evaluate.log",
    benchmark:
        "benchmarks/{family}/evaluate.tsv"
    script:
        "../workflow/scripts/evaluate.py"
