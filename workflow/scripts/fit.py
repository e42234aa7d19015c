"""fit: codebook, scales and codes per layer at its planned width."""
import pandas as pd

from sopq.logs import rule_log, usable_cpus
from sopq.model import get_weight, load_model, quantizable_layers
from sopq.sensitivity import GramLookup, fit_layers
from sopq.store import save_quantized

p = snakemake.params
with rule_log(snakemake.log[0], snakemake.threads):
    plan = pd.read_parquet(snakemake.input.plan)
    model, _ = load_model(snakemake.input.model, p.kind, trust_remote_code=p.trust_remote_code)
    layers = quantizable_layers(model, p.include, p.exclude)
    weights = {name: get_weight(layers[name]) for name in plan["layer"]}
    gram = GramLookup.from_files(snakemake.input.stats, snakemake.input.grams)
    formats = {row.layer: (row.bits, row.group, row.scale_format) for row in plan.itertuples()}
    fitted = fit_layers(weights, gram, formats, p.error_feedback, workers=usable_cpus(snakemake.threads))
    save_quantized(fitted, snakemake.output[0])
