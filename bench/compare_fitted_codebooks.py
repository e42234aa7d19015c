"""Fitted codebooks of a model's layers, written to a file or compared byte for byte with one
written by another version of sopq (e.g. before a change to the codebook DP).

For every layer and b = 4..8, free and fp8 modes: fit_scales_and_codebook with group 32 and fp16
scales on the calibration Gram's diagonal, as the pipeline's fit does before error feedback.

    PYTHONPATH=<old checkout> python bench/compare_fitted_codebooks.py --model resources/models/bert \
        --calib results/bert/calib --kind encoder --out /tmp/old.pt
    PYTHONPATH=$PWD python bench/compare_fitted_codebooks.py ... --out /tmp/new.pt --against /tmp/old.pt
"""
from __future__ import annotations

import argparse

import torch

from sopq.model import get_weight, load_model, quantizable_layers
from sopq.quantize import fit_scales_and_codebook
from sopq.sensitivity import GramLookup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True, help="directory with stats.parquet and grams.safetensors")
    parser.add_argument("--kind", default="causal_lm")
    parser.add_argument("--out", required=True)
    parser.add_argument("--against", help="codebooks written by another version, to compare with")
    args = parser.parse_args()
    torch.set_num_threads(1)

    model, _ = load_model(args.model, args.kind)
    layers = quantizable_layers(model, [".*"], ["lm_head", "embed", "pooler"])
    gram = GramLookup.from_files(f"{args.calib}/stats.parquet", f"{args.calib}/grams.safetensors")
    fitted = {}
    for name, module in layers.items():
        W, h = get_weight(module).float(), gram[name].diagonal().float()
        for mode in ("free", "fp8"):
            for bits in range(4, 9):
                codebook, scales = fit_scales_and_codebook(W, h, bits, 32, "fp16", mode)
                fitted[f"{name}/{mode}/{bits}"] = (codebook, scales)
    torch.save(fitted, args.out)
    print(f"{len(fitted)} fits of {len(layers)} layers written to {args.out}")
    if args.against:
        other = torch.load(args.against)
        differ = [key for key in fitted if not all(torch.equal(a, b) for a, b in zip(fitted[key], other[key]))]
        print(f"{len(fitted) - len(differ)} of {len(fitted)} fits byte-identical (codebook and scales)")
        for key in differ:
            print(f"differs: {key}")


if __name__ == "__main__":
    main()
