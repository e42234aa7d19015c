"""fit: codebook, scales and codes per layer at its planned option, from the sensitivity fits."""
import pandas as pd

from sopq.logs import rule_log
from sopq.sensitivity import load_fits, plan_keys
from sopq.store import save_quantized

with rule_log(snakemake.log[0], snakemake.threads):
    plan = pd.read_parquet(snakemake.input.plan)
    save_quantized(load_fits(snakemake.input.fits, plan_keys(plan)), snakemake.output[0])
