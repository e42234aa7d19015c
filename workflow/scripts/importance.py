"""importance: alpha per layer, the end-to-end change per unit of relative output error."""
from pathlib import Path

import pandas as pd

from sopq.evaluate import measure_layer_importance, probe_layer_importance_streaming
from sopq.io import write_parquet
from sopq.logs import rule_log
from sopq.model import load_empty_model, load_model, quantizable_layers, token_sequences
from sopq.sensitivity import GramLookup

p = snakemake.params
settings = p.importance
with rule_log(snakemake.log[0], snakemake.threads):
    gram = GramLookup.from_files(snakemake.input.stats, snakemake.input.grams)
    if settings["method"] == "probe":
        # One block in memory at a time.
        model, tokenizer, weights = load_empty_model(snakemake.input.model, p.kind, trust_remote_code=p.trust_remote_code)
        layers = quantizable_layers(model, p.include, p.exclude)
        sequences = token_sequences(tokenizer, Path(snakemake.input.text).read_text(), settings["n_seq"], p.seq_len)
        alpha = probe_layer_importance_streaming(model, weights, p.kind, layers, sequences, gram, p.seed,
                                                 n_probes=settings["n_probes"])
    else:
        model, tokenizer = load_model(snakemake.input.model, p.kind, trust_remote_code=p.trust_remote_code)
        layers = quantizable_layers(model, p.include, p.exclude)
        sequences = token_sequences(tokenizer, Path(snakemake.input.text).read_text(), settings["n_seq"], p.seq_len)
        alpha = measure_layer_importance(model, p.kind, layers, sequences, gram, settings["rel_error"], p.seed)
    write_parquet(pd.DataFrame({"layer": list(alpha), "alpha": list(alpha.values())}), snakemake.output[0])
