"""Per-layer scoring: fit every layer at every allowed width and measure its errors."""
from __future__ import annotations

import itertools
import multiprocessing
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import pandas as pd
import torch
from tqdm import tqdm

from sopq.calibrate import load_gram
from sopq.formats import sop_bpw
from sopq.metrics import layer_errors
from sopq.quantize import QuantizedLayer, quantize_layer


def resolve_group(group: int | str, k: int) -> int:
    """Config group ("row" or an integer) as inputs per scale for a layer with K inputs."""
    return k if group == "row" else min(int(group), k)


class GramLookup:
    """layer name -> its Gram matrix (float64), loading each shared Gram once while consecutive
    layers use it (q/k/v, gate/up); the lookup itself keeps only the latest one in memory."""

    def __init__(self, stats: pd.DataFrame, load: Callable[[str], torch.Tensor]):
        self._key_of = stats.drop_duplicates("layer").set_index("layer")["gram_key"].to_dict()
        self._load = load
        self._cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_files(cls, stats_path, grams_path) -> "GramLookup":
        """From the calibrate stage's outputs: stats.parquet (layer -> gram_key) and grams.safetensors."""
        return cls(pd.read_parquet(stats_path, columns=["layer", "gram_key"]), lambda key: load_gram(grams_path, key))

    def __getitem__(self, layer: str) -> torch.Tensor:
        key = self._key_of[layer]
        if key not in self._cache:
            self._cache.clear()
            self._cache[key] = self._load(key).double()
        return self._cache[key]


def _map_layers(fn, tasks, workers: int, desc: str, total: int):
    """Yield fn(*task) for each task in order. With workers > 1, single-threaded worker
    processes share the layers: per-layer fitting is many small ops, which threads within one
    process do not speed up. A bounded window of tasks is in flight, so only a few Gram
    matrices are held at a time."""
    tasks = iter(tasks)
    with tqdm(desc=desc, unit="layer", total=total) as bar:
        if workers <= 1:
            for task in tasks:
                yield fn(*task)
                bar.update()
            return
        # fork, as torch's DataLoader does: each child sets one thread before any torch work.
        # (spawn would rerun a Snakemake script's top level in every child.)
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            window = deque(pool.submit(fn, *task) for task in itertools.islice(tasks, 2 * workers))
            while window:
                result = window.popleft().result()
                for task in itertools.islice(tasks, 1):
                    window.append(pool.submit(fn, *task))
                yield result
                bar.update()


def fit_layers(
    weights: dict[str, torch.Tensor],
    gram: GramLookup,
    formats: dict[str, tuple[int, int, str]],
    error_feedback: bool,
    desc: str = "fit",
    workers: int = 1,
) -> dict[str, QuantizedLayer]:
    """Quantize each layer named in `formats` (layer -> (bits, group, scale_format))."""
    tasks = ((weights[name], gram[name], bits, group, fmt, error_feedback) for name, (bits, group, fmt) in formats.items())
    return dict(zip(formats, _map_layers(quantize_layer, tasks, workers, desc, len(formats))))


def _score_layer(name, W, H, allowed_bits, group, scale_format, error_feedback) -> list[dict]:
    n, k = W.shape
    g = resolve_group(group, k)
    rows = []
    for bits in sorted(allowed_bits):
        q = quantize_layer(W, H, bits, g, scale_format, error_feedback)
        rows.append(
            {"layer": name, "bits": bits, "group": g, "scale_format": scale_format, "n": n, "k": k,
             "bpw": sop_bpw(bits, g, scale_format, n, k), **layer_errors(W, q.dequantize(), H)}
        )
    return rows


def score_layers(
    weights: dict[str, torch.Tensor],
    gram: GramLookup,
    allowed_bits: list[int],
    group,
    scale_format: str,
    error_feedback: bool,
    workers: int = 1,
) -> pd.DataFrame:
    """One row per (layer, bits): layer, bits, group, scale_format, n, k, bpw, e_out, mse, acos."""
    tasks = ((name, W, gram[name], allowed_bits, group, scale_format, error_feedback) for name, W in weights.items())
    return pd.DataFrame([row for rows in _map_layers(_score_layer, tasks, workers, "sensitivity", len(weights)) for row in rows])
