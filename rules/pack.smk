rule pack:
    input:
        codebooks="results/{family}/codebooks.safetensors",
        # Recorded in the manifest: sopq.load rebuilds the model from it.
        model="resources/models/{family}",
    output:
        directory("results/{family}/packed"),
    params:
        kind=MODEL_PARAMS["kind"],
        trust_remote_code=MODEL_PARAMS["trust_remote_code"],
    conda:
        "../envs/sopq.yaml"
    log:
        "logs/{family}/pack.log",
    benchmark:
        "benchmarks/{family}/pack.tsv"
    script:
        "../workflow/scripts/pack.py"
