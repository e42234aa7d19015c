"""calibrate: per-channel input statistics (Parquet) and Gram matrices (safetensors) of every layer."""
from pathlib import Path

import pandas as pd

from sopq.calibrate import collect_stats, stream_block_stats
from sopq.io import safetensors_stream, save_safetensors, write_parquet
from sopq.logs import rule_log
from sopq.model import load_empty_model, load_model, quantizable_layers, token_sequences

p = snakemake.params
with rule_log(snakemake.log[0], snakemake.threads) as log:
    load = load_empty_model if p.streaming else load_model
    model, tokenizer, *weights = load(snakemake.input.model, p.kind, trust_remote_code=p.trust_remote_code)
    layers = quantizable_layers(model, p.include, p.exclude)
    sequences = token_sequences(tokenizer, Path(snakemake.input.text).read_text(), p.n_seq, p.seq_len)
    log.info("calibrating %d layers on %d sequences x %d tokens (%s)", len(layers), p.n_seq, p.seq_len,
             "block by block" if p.streaming else "whole model")
    if p.streaming:
        # Each block's Gram matrices go to disk before the next block runs.
        frames = []
        with safetensors_stream(snakemake.output.grams) as add_gram:
            for frame, grams in stream_block_stats(model, weights[0], layers, sequences, p.batch_size):
                frames.append(frame)
                for key, gram in grams.items():
                    add_gram(key, gram)
        stats = pd.concat(frames, ignore_index=True)
    else:
        stats, grams = collect_stats(model, layers, sequences, p.batch_size)
        save_safetensors(grams, snakemake.output.grams)
    log.info("%d distinct layer inputs (Gram matrices)", stats["gram_key"].nunique())
    write_parquet(stats, snakemake.output.stats)
