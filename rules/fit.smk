rule fit:
    input:
        model="resources/models/{family}",
        plan="results/{family}/plan.parquet",
        stats="results/{family}/calib/stats.parquet",
        grams="results/{family}/calib/grams.safetensors",
    output:
        "results/{family}/codebooks.safetensors",
    params:
        **MODEL_PARAMS,
        error_feedback=config["quantization"]["error_feedback"],
    threads: workflow.cores
    resources:
        mem_mb=8000,
    conda:
        "../envs/sopq.yaml"
    log:
        "logs/{family}/fit.log",
    benchmark:
        "benchmarks/{family}/fit.tsv"
    script:
        "../workflow/scripts/fit.py"
