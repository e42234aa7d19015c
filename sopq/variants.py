"""The quantized variants the evaluate stage compares, and their per-layer and summary tables."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from sopq.baselines import BASELINES
from sopq.formats import average_bpw, sop_bpw
from sopq.metrics import layer_errors
from sopq.sensitivity import GramLookup, fit_layers, resolve_group
from sopq.store import read_packed

# Width of the uniform SOP variant, "sop6": the report measures promotion against it.
UNIFORM_BITS = 6


def _sop_variant(fitted) -> tuple[dict, dict]:
    weights = {name: q.dequantize() for name, q in fitted.items()}
    bpw = {name: sop_bpw(q.bits, q.group, q.scale_format, *q.codes.shape) for name, q in fitted.items()}
    return weights, bpw


def build_variants(weights: dict[str, torch.Tensor], gram: GramLookup, packed_dir, quantization: dict, workers: int = 1):
    """{variant: {layer: W_hat}} and {variant: {layer: all-in bpw}} for sop_promoted (read back
    from the packed files, so the evaluation checks what was shipped), sop6 (every layer at
    UNIFORM_BITS; quantization: group, scale_format, error_feedback) and every fixed-format
    baseline."""
    variants, bpw = {}, {}
    variants["sop_promoted"], bpw["sop_promoted"] = _sop_variant(read_packed(packed_dir))
    uniform = {
        name: (UNIFORM_BITS, resolve_group(quantization["group"], W.shape[1]), quantization["scale_format"])
        for name, W in weights.items()
    }
    sop6 = fit_layers(weights, gram, uniform, quantization["error_feedback"], "sop6", workers)
    variants["sop6"], bpw["sop6"] = _sop_variant(sop6)
    for name, baseline in BASELINES.items():
        results = {layer: baseline(W) for layer, W in weights.items()}
        variants[name] = {layer: W_hat.float() for layer, (W_hat, _) in results.items()}
        bpw[name] = {layer: b for layer, (_, b) in results.items()}
    return variants, bpw


def layer_table(weights, gram: GramLookup, variants: dict, bpw: dict) -> pd.DataFrame:
    """One row per (variant, layer): n, k, bpw, e_out, mse, acos. Layers outer so each Gram
    matrix is loaded once."""
    rows = []
    for layer, W in weights.items():
        H = gram[layer]
        for variant, quantized in variants.items():
            rows.append({"variant": variant, "layer": layer, "n": W.shape[0], "k": W.shape[1],
                         "bpw": bpw[variant][layer], **layer_errors(W, quantized[layer], H)})
    return pd.DataFrame(rows)


def summarize(per_layer: pd.DataFrame, end_to_end: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: all-in bpw averaged over weights, E_out median/p95/max, end-to-end metrics."""
    def stats(g: pd.DataFrame) -> pd.Series:
        return pd.Series({
            "bpw": average_bpw(g),
            "e_out_median": g["e_out"].median(),
            "e_out_p95": g["e_out"].quantile(0.95),
            "e_out_max": g["e_out"].max(),
        })

    summary = per_layer.groupby("variant", sort=False)[["n", "k", "bpw", "e_out"]].apply(stats).reset_index()
    reference = pd.DataFrame([{"variant": "reference", "bpw": np.nan}])
    return pd.concat([reference, summary], ignore_index=True).merge(end_to_end, on="variant", how="left")
