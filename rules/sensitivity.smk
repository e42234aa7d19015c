# Layer importance (forward passes) and per-layer scoring (many small fits, spread over
# single-threaded worker processes: fork-join threading of small ops collapses when cores are
# shared). Both take every core they are given.
rule importance:
    input:
        model="resources/models/{family}",
        text="resources/text/calib.txt",
        stats="results/{family}/calib/stats.parquet",
        grams="results/{family}/calib/grams.safetensors",
    output:
        "results/{family}/importance.parquet",
    params:
        **MODEL_PARAMS,
        importance=config["importance"],
        seq_len=config["calibration"]["seq_len"],
        seed=config["seed"],
    threads: workflow.cores
    resources:
        mem_mb=8000,
    conda:
        "../envs/sopq.yaml"
    log:
        "logs/{family}/importance.log",
    benchmark:
        "benchmarks/{family}/importance.tsv"
    script:
        "../workflow/scripts/importance.py"


rule sensitivity:
    input:
        model="resources/models/{family}",
        stats="results/{family}/calib/stats.parquet",
        grams="results/{family}/calib/grams.safetensors",
        importance="results/{family}/importance.parquet",
    output:
        table="results/{family}/sensitivity.parquet",
        fits=directory("results/{family}/fits"),
    params:
        **MODEL_PARAMS,
        quantization=config["quantization"],
    threads: workflow.cores
    resources:
        mem_mb=8000,
    conda:
        "../envs/sopq.yaml"
    log:
        "logs/{family}/sensitivity.log",
    benchmark:
        "benchmarks/{family}/sensitivity.tsv"
    script:
        "../workflow/scripts/sensitivity.py"
