"""pack: codes packed densely (exactly b bits per weight) with a checksummed manifest."""
from sopq.logs import rule_log
from sopq.store import load_quantized, write_packed

with rule_log(snakemake.log[0]):
    write_packed(load_quantized(snakemake.input[0]), snakemake.output[0], snakemake.wildcards.family)
