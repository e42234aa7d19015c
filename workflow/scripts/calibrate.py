"""calibrate: per-channel input statistics (Parquet) and Gram matrices (safetensors) of every layer."""
from pathlib import Path

from sopq.calibrate import collect_stats, collect_stats_streaming
from sopq.io import save_safetensors, write_parquet
from sopq.logs import rule_log
from sopq.model import load_empty_model, load_model, quantizable_layers, token_sequences

p = snakemake.params
with rule_log(snakemake.log[0], snakemake.threads) as log:
    if p.streaming:
        model, tokenizer, weights = load_empty_model(snakemake.input.model, p.kind, trust_remote_code=p.trust_remote_code)
    else:
        model, tokenizer = load_model(snakemake.input.model, p.kind, trust_remote_code=p.trust_remote_code)
    layers = quantizable_layers(model, p.include, p.exclude)
    sequences = token_sequences(tokenizer, Path(snakemake.input.text).read_text(), p.n_seq, p.seq_len)
    log.info("calibrating %d layers on %d sequences x %d tokens (%s)", len(layers), p.n_seq, p.seq_len,
             "block by block" if p.streaming else "whole model")
    if p.streaming:
        stats, grams = collect_stats_streaming(model, weights, layers, sequences, p.batch_size)
    else:
        stats, grams = collect_stats(model, layers, sequences, p.batch_size)
    log.info("%d distinct layer inputs (Gram matrices)", len(grams))
    write_parquet(stats, snakemake.output.stats)
    save_safetensors(grams, snakemake.output.grams)
