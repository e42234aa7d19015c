# The planned form of every layer, taken from the fits the sensitivity stage already made (the
# fit is deterministic, so this equals fitting again, without the cost).
rule fit:
    input:
        plan="results/{family}/plan.parquet",
        fits="results/{family}/fits",
    output:
        "results/{family}/codebooks.safetensors",
    conda:
        "../envs/sopq.yaml"
    log:
        "logs/{family}/fit.log",
    benchmark:
        "benchmarks/{family}/fit.tsv"
    script:
        "../workflow/scripts/fit.py"
