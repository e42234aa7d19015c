"""sensitivity: fit every layer of one shard at every allowed width and search option, measure
its errors, attach alpha, keep the fits."""
import pandas as pd

from sopq.io import write_parquet
from sopq.logs import rule_log, usable_cpus
from sopq.malloc import HEAP_ONLY, set_malloc_maps
from sopq.model import layer_shard, read_layer_weights
from sopq.sensitivity import GramLookup, score_layers, search_options

p = snakemake.params
q = p.quantization
with rule_log(snakemake.log[0], snakemake.threads):
    set_malloc_maps(HEAP_ONLY)  # inherited by the worker processes
    weights = read_layer_weights(snakemake.input.model, p.kind, p.include, p.exclude,
                                 lambda names: layer_shard(names, *p.shard), trust_remote_code=p.trust_remote_code)
    gram = GramLookup.from_files(snakemake.input.stats, snakemake.input.grams)
    table = score_layers(
        weights, gram, q["allowed_bits"], search_options(q), q["error_feedback"],
        workers=usable_cpus(snakemake.threads), max_alternations=q["max_alternations"], fits_dir=snakemake.output.fits,
    )
    alpha = pd.read_parquet(snakemake.input.importance).set_index("layer")["alpha"]
    table["alpha"] = table["layer"].map(alpha)
    if table["alpha"].isna().any():
        raise ValueError(f"{snakemake.input.importance} lacks layers {sorted(set(table.layer) - set(alpha.index))}; rerun importance")
    write_parquet(table, snakemake.output.table)
