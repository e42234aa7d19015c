"""evaluate: SOP (promoted, uniform, promoted across the budget sweep) and every baseline, per
layer and end to end, one block of the model in memory at a time."""
from pathlib import Path

import pandas as pd

from sopq.io import write_parquet
from sopq.logs import rule_log, usable_cpus
from sopq.model import get_weight, load_empty_model, quantizable_layers, token_sequences
from sopq.sensitivity import GramLookup
from sopq.variants import build_variants, evaluate_streaming, summarize

p = snakemake.params
with rule_log(snakemake.log[0], snakemake.threads):
    model, tokenizer, weights = load_empty_model(snakemake.input.model, p.kind, trust_remote_code=p.trust_remote_code)
    layers = quantizable_layers(model, p.include, p.exclude)
    gram = GramLookup.from_files(snakemake.input.stats, snakemake.input.grams)

    plans = pd.read_parquet(snakemake.input.sweep_plans)
    variants = build_variants(
        {name: tuple(get_weight(module).shape) for name, module in layers.items()}, snakemake.input.packed,
        p.quantization, fits_dir=snakemake.input.fits, sensitivity=pd.read_parquet(snakemake.input.sensitivity),
        # The plan at budget_bpw is sop_promoted itself: measured once, under that name.
        sweep_plans=plans[plans["budget_bpw"].isin(set(p.evaluate_budgets) - {p.budget_bpw})], comparisons=p.comparisons,
    )
    e = p.evaluation
    sequences = token_sequences(tokenizer, Path(snakemake.input.text).read_text(), e["n_seq"], e["seq_len"])
    per_layer, end_to_end = evaluate_streaming(model, weights, p.kind, layers, gram, variants, sequences, e["batch_size"],
                                               workers=usable_cpus(snakemake.threads))
    write_parquet(per_layer, snakemake.output.layers)
    write_parquet(summarize(per_layer, end_to_end), snakemake.output.summary)
