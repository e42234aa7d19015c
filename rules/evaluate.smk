rule evaluate:
    input:
        model="resources/models/{family}",
        text="resources/text/eval.txt",
        packed="results/{family}/packed",
        stats="results/{family}/calib/stats.parquet",
        grams="results/{family}/calib/grams.safetensors",
    output:
        summary=report("results/{family}/eval.parquet", caption="../workflow/report/eval.rst", category="{family}"),
        layers="results/{family}/eval_layers.parquet",
    params:
        **MODEL_PARAMS,
        quantization={key: config["quantization"][key] for key in ("group", "scale_format", "error_feedback")},
        evaluation=config["evaluation"],
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
