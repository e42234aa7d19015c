"""pack: codes packed densely (exactly b bits per weight) with a checksummed manifest."""
from sopq.logs import rule_log
from sopq.store import load_quantized, write_packed

p = snakemake.params
with rule_log(snakemake.log[0], snakemake.threads):
    source = {"model": snakemake.input.model, "kind": p.kind, "trust_remote_code": p.trust_remote_code}
    write_packed(load_quantized(snakemake.input.codebooks), snakemake.output[0], snakemake.wildcards.family, source)
