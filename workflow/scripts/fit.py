"""fit: codebook, scales and codes per layer at its planned option, from the sensitivity fits."""
import pandas as pd

from sopq.logs import rule_log
from sopq.sensitivity import load_fits, plan_keys
from sopq.store import LazyLayers, save_quantized

with rule_log(snakemake.log[0], snakemake.threads):
    keys = plan_keys(pd.read_parquet(snakemake.input.plan))
    # One layer's fit in memory at a time.
    save_quantized(LazyLayers(keys, lambda name: load_fits(snakemake.input.fits, {name: keys[name]})[name]),
                   snakemake.output[0])
