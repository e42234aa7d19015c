rule calibrate:
    input:
        model="resources/models/{family}",
        text="resources/text/calib.txt",
    output:
        stats="results/{family}/calib/stats.parquet",
        grams="results/{family}/calib/grams.safetensors",
    params:
        **MODEL_PARAMS,
        n_seq=config["calibration"]["n_seq"],
        seq_len=config["calibration"]["seq_len"],
        batch_size=config["calibration"]["batch_size"],
        streaming=config["calibration"].get("streaming", True),
    threads: workflow.cores
    resources:
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/sopq.yaml"
    log:
        "logs/{family}/calibrate.log",
    benchmark:
        "benchmarks/{family}/calibrate.tsv"
    script:
        "../workflow/scripts/calibrate.py"
