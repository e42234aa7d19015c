"""Per-layer scoring: fit every layer at every allowed width and measure its errors."""
from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch
from tqdm import tqdm

from sopq.formats import sop_bpw
from sopq.metrics import layer_errors
from sopq.quantize import QuantizedLayer, quantize_layer


def resolve_group(group: int | str, k: int) -> int:
    """Config group ("row" or an integer) as inputs per scale for a layer with K inputs."""
    return k if group == "row" else min(int(group), k)


class GramLookup:
    """layer name -> its Gram matrix (float64), loading each shared Gram once while consecutive
    layers use it (q/k/v, gate/up), so only one Gram is held in memory at a time."""

    def __init__(self, stats: pd.DataFrame, load: Callable[[str], torch.Tensor]):
        self._key_of = stats.drop_duplicates("layer").set_index("layer")["gram_key"].to_dict()
        self._load = load
        self._cache: dict[str, torch.Tensor] = {}

    def __getitem__(self, layer: str) -> torch.Tensor:
        key = self._key_of[layer]
        if key not in self._cache:
            self._cache.clear()
            self._cache[key] = self._load(key).double()
        return self._cache[key]


def fit_layers(
    weights: dict[str, torch.Tensor],
    gram: GramLookup,
    formats: dict[str, tuple[int, int, str]],
    error_feedback: bool,
    desc: str = "fit",
) -> dict[str, QuantizedLayer]:
    """Quantize each layer named in `formats` (layer -> (bits, group, scale_format))."""
    return {
        name: quantize_layer(weights[name], gram[name], bits, group, scale_format, error_feedback)
        for name, (bits, group, scale_format) in tqdm(formats.items(), desc=desc, unit="layer")
    }


def score_layers(
    weights: dict[str, torch.Tensor],
    gram: GramLookup,
    allowed_bits: list[int],
    group,
    scale_format: str,
    error_feedback: bool,
) -> pd.DataFrame:
    """One row per (layer, bits): layer, bits, group, scale_format, n, k, bpw, e_out, mse, acos."""
    rows = []
    for name in tqdm(weights, desc="sensitivity", unit="layer"):
        W = weights[name]
        H = gram[name]
        n, k = W.shape
        g = resolve_group(group, k)
        for bits in sorted(allowed_bits):
            q = quantize_layer(W, H, bits, g, scale_format, error_feedback)
            rows.append(
                {"layer": name, "bits": bits, "group": g, "scale_format": scale_format, "n": n, "k": k,
                 "bpw": sop_bpw(bits, g, scale_format, n, k), **layer_errors(W, q.dequantize(), H)}
            )
    return pd.DataFrame(rows)
