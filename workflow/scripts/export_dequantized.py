"""export_dequantized: a plain HF checkpoint holding W_hat, for tools that cannot read packed/."""
from sopq.logs import rule_log
from sopq.packed_model import export_dequantized

with rule_log(snakemake.log[0], snakemake.threads):
    export_dequantized(snakemake.input.packed, snakemake.output[0], model_dir=snakemake.input.model)
