# Not part of the default target: `snakemake --cores 2 results/{family}/dequantized`.
rule export_dequantized:
    input:
        packed="results/{family}/packed",
        model="resources/models/{family}",
    output:
        directory("results/{family}/dequantized"),
    conda:
        "../envs/sopq.yaml"
    log:
        "logs/{family}/export_dequantized.log",
    benchmark:
        "benchmarks/{family}/export_dequantized.tsv"
    script:
        "../workflow/scripts/export_dequantized.py"
