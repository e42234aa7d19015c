rule pack:
    input:
        "results/{family}/codebooks.safetensors",
    output:
        directory("results/{family}/packed"),
    conda:
        "../envs/sopq.yaml"
    log:
        "logs/{family}/pack.log",
    benchmark:
        "benchmarks/{family}/pack.tsv"
    script:
        "../workflow/scripts/pack.py"
