"""Per-layer scoring: fit every layer at every allowed width and search option, measure its errors,
and keep the fits for the stages after promotion."""
from __future__ import annotations

import contextlib
import json
import multiprocessing
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from sopq.calibrate import load_gram
from sopq.formats import sop_bpw
from sopq.metrics import layer_errors_many
from sopq.io import atomic_path
from sopq.packing import pack_codes, unpack_codes
from sopq.quantize import MAX_ALTERNATIONS, QuantizedLayer, inverse_cholesky, quantize_layer
from sopq.workers import use_one_thread


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


# How many finished layers may wait, per worker, behind one that is still being fitted.
MAX_AHEAD = 8


def _map_layers(fn, tasks, workers: int, desc: str, total: int):
    """Yield fn(*task) for each task in order. With workers > 1, single-threaded worker
    processes share the layers: per-layer fitting is many small ops, which threads within one
    process do not speed up. At most 2 * workers tasks are queued or running, so only a few
    Gram matrices are held at a time; a new task starts whenever any finishes, not only the
    oldest: a slow layer (a down projection's K^3 factor) would otherwise leave the other
    workers idle until it is done. Finished results wait, at most MAX_AHEAD * workers of them,
    until the ones before them are yielded."""
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
        with ProcessPoolExecutor(workers, mp_context=context, initializer=use_one_thread) as pool:
            submitted: deque = deque()  # futures in task order, from the oldest not yet yielded
            running: set = set()
            exhausted = False
            while True:
                while not exhausted and len(running) < 2 * workers and len(submitted) < MAX_AHEAD * workers:
                    task = next(tasks, None)
                    if task is None:
                        exhausted = True
                        break
                    future = pool.submit(fn, *task)
                    submitted.append(future)
                    running.add(future)
                if not submitted:
                    return
                if not submitted[0].done():
                    _, pending = wait(running, return_when=FIRST_COMPLETED)
                    running = set(pending)
                    continue
                running.discard(submitted[0])
                yield submitted.popleft().result()
                bar.update()


@dataclass(frozen=True)
class FitOption:
    """One point of the search space besides the width: group size ("row" or inputs per scale),
    scale storage format and codebook mode."""

    group: int | str
    scale_format: str
    mode: str = "free"


def search_options(quantization: dict) -> list[FitOption]:
    """The options sensitivity scores and promotion chooses from: quantization.search
    (groups x scale_formats x modes) when given, else the single configured group/format/mode."""
    search = quantization.get("search") or {}
    groups = search.get("groups", [quantization["group"]])
    formats = search.get("scale_formats", [quantization["scale_format"]])
    modes = search.get("modes", [quantization.get("mode", "free")])
    return [FitOption(g, f, m) for g in groups for f in formats for m in modes]


def option_key(bits: int, group: int, scale_format: str, mode: str) -> str:
    """Name of one fitted form of a layer in the fits file, e.g. "b6.g32.fp16.free"."""
    return f"b{bits}.g{group}.{scale_format}.{mode}"


def _score_layer(name, W, H, allowed_bits, options, error_feedback, max_alternations, fits_dir=None):
    """Every (bits, option) fit of one layer: the rows of the sensitivity table; with fits_dir,
    the fits are also written there (save_layer_fits). The GPTQ factor of H is computed once and
    shared by all of them, the float64 product W H behind the errors once per option (its
    widths' reconstructions are held together). Runs in a worker process: packing and writing
    the fits here, not in the parent, keeps the parent free to hand out the next layers."""
    n, k = W.shape
    hinv = inverse_cholesky(H) if error_feedback else None
    rows, fits = [], {}
    for option in options:
        g = resolve_group(option.group, k)
        option_fits = {
            option_key(bits, g, option.scale_format, option.mode): quantize_layer(
                W, H, bits, g, option.scale_format, error_feedback, option.mode, hinv, max_alternations)
            for bits in sorted(allowed_bits)
        }
        errors = layer_errors_many(W, {key: q.dequantize() for key, q in option_fits.items()}, H)
        rows.extend(
            {"layer": name, "bits": q.bits, "group": g, "scale_format": option.scale_format, "mode": option.mode,
             "n": n, "k": k, "bpw": sop_bpw(q.bits, g, option.scale_format, n, k), **errors[key]}
            for key, q in option_fits.items()
        )
        fits.update(option_fits)
    if fits_dir is not None:
        save_layer_fits(fits, fits_dir, name)
    return rows


def score_layers(
    weights: dict[str, torch.Tensor],
    gram: GramLookup,
    allowed_bits: list[int],
    options: list[FitOption],
    error_feedback: bool,
    workers: int = 1,
    max_alternations: int = MAX_ALTERNATIONS,
    fits_dir=None,
) -> pd.DataFrame:
    """One row per (layer, option, bits): layer, bits, group, scale_format, mode, n, k, bpw, e_out,
    mse, acos. With fits_dir, every fit is also written there (save_layer_fits, one file per
    layer as it completes, so memory holds one layer's fits), for later stages to reuse; the
    directory appears only once every layer is written."""
    rows = []
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(fits_dir)) if fits_dir is not None else None
        if tmp is not None:
            tmp.mkdir()
        tasks = (
            (name, W, gram[name], allowed_bits, options, error_feedback, max_alternations, tmp)
            for name, W in weights.items()
        )
        for layer_rows in _map_layers(_score_layer, tasks, workers, "sensitivity", len(weights)):
            rows.extend(layer_rows)
    return pd.DataFrame(rows)


def _fits_file(fits_dir, layer: str) -> Path:
    return Path(fits_dir) / f"{layer}.safetensors"


def save_layer_fits(by_option: dict[str, QuantizedLayer], fits_dir, layer: str) -> None:
    """Every fit of one layer ({option key: fit}) as fits_dir/{layer}.safetensors, codes packed
    densely (sopq.packing), so the fit and evaluate stages take any (layer, option) from here
    instead of fitting it again."""
    tensors, meta = {}, {}
    for key, q in by_option.items():
        tensors.update({f"{key}.codes": pack_codes(q.codes, q.bits), f"{key}.codebook": q.codebook, f"{key}.scales": q.scales,
                        f"{key}.fitted_codebook": q.fitted_codebook})
        meta[key] = {"bits": q.bits, "group": q.group, "scale_format": q.scale_format, "shape": list(q.codes.shape)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(_fits_file(fits_dir, layer)), metadata={"fits": json.dumps(meta)})


def load_fits(fits_dir, wanted: dict[str, str]) -> dict[str, QuantizedLayer]:
    """{layer: QuantizedLayer} for wanted = {layer: option key} from a sensitivity fits directory."""
    out = {}
    for layer, key in wanted.items():
        path = _fits_file(fits_dir, layer)
        if not path.exists():
            raise ValueError(f"{path} is missing: rerun sensitivity (layer {layer} has no stored fits)")
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["fits"])
            if key not in meta:
                raise ValueError(f"{path} has no fit {key} of layer {layer}; rerun sensitivity with this option in the search space")
            m = meta[key]
            out[layer] = QuantizedLayer(
                codebook=f.get_tensor(f"{key}.codebook"), scales=f.get_tensor(f"{key}.scales"),
                codes=unpack_codes(f.get_tensor(f"{key}.codes"), m["bits"], tuple(m["shape"])),
                bits=m["bits"], group=m["group"], scale_format=m["scale_format"],
                fitted_codebook=f.get_tensor(f"{key}.fitted_codebook") if f"{key}.fitted_codebook" in f.keys() else None,
            )
    return out


def plan_keys(plan: pd.DataFrame) -> dict[str, str]:
    """{layer: option key} of a plan (promote's output)."""
    return {row.layer: option_key(row.bits, row.group, row.scale_format, row.mode) for row in plan.itertuples()}
