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
        runtime=240,
    conda:
        "../envs/sopq.yaml"
    log:
        "logs/{family}/importance.log",
    benchmark:
        "benchmarks/{family}/importance.tsv"
    script:
        "../workflow/scripts/importance.py"


# One shard: the layers of a range of blocks, each read from disk alone (see common.smk).
rule sensitivity_shard:
    input:
        model="resources/models/{family}",
        stats="results/{family}/calib/stats.parquet",
        grams="results/{family}/calib/grams.safetensors",
        importance="results/{family}/importance.parquet",
    output:
        table="results/{family}/sensitivity/shard{shard}.parquet",
        fits=directory("results/{family}/sensitivity/fits{shard}"),
    params:
        **MODEL_PARAMS,
        shard=shard_param,
        quantization=config["quantization"],
    threads: workflow.cores
    resources:
        mem_mb=8000,
        runtime=240,
    group:
        "sensitivity_shards"
    conda:
        "../envs/sopq.yaml"
    log:
        "logs/{family}/sensitivity_shard{shard}.log",
    benchmark:
        "benchmarks/{family}/sensitivity_shard{shard}.tsv"
    script:
        "../workflow/scripts/sensitivity.py"


# The shards' tables concatenated and their per-layer fit files linked into one folder.
rule sensitivity:
    input:
        tables=shard_parts("results/{family}/sensitivity/shard{shard}.parquet"),
        fits=shard_parts("results/{family}/sensitivity/fits{shard}"),
    output:
        table="results/{family}/sensitivity.parquet",
        fits=directory("results/{family}/fits"),
    conda:
        "../envs/sopq.yaml"
    log:
        "logs/{family}/sensitivity.log",
    benchmark:
        "benchmarks/{family}/sensitivity.tsv"
    script:
        "../workflow/scripts/merge_shards.py"
