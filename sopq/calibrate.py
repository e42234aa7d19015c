"""Calibration statistics: per-input-channel moments and the Gram matrix H = X^T X / T of every layer."""
from __future__ import annotations

import contextlib
import weakref

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .model import run_model
from .stream import BlockWalk


class _InputStats:
    """Running sums over the tokens of one distinct layer input (shared by q/k/v, gate/up, ...)."""

    def __init__(self, K: int):
        self.tokens = 0
        self.sum = torch.zeros(K, dtype=torch.float64)
        self.sum_sq = torch.zeros(K, dtype=torch.float64)
        self.absmax = torch.zeros(K, dtype=torch.float64)
        self.gram = torch.zeros(K, K, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.sum += x.sum(0, dtype=torch.float64)
        self.sum_sq += x.square().sum(0, dtype=torch.float64)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0).double())
        # One batch's product in float32 is accurate to ~1e-6 and 3x faster than float64 on CPU;
        # the float64 running sum keeps many batches from losing precision.
        self.gram.add_(x.T @ x)


def _same_data_key(x: torch.Tensor) -> tuple:
    # Equal keys on two live tensors mean identical contents; _version catches in-place edits in between.
    return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x._version)


class _StatsRecorder:
    """Forward pre-hooks that accumulate each layer's input statistics, one shared input once.

    Layers fed the very same tensor in a forward pass (q/k/v, gate/up) share one accumulator,
    keyed by the first of them in module order; `table()` says which one each uses (gram_key).
    """

    def __init__(self, layers: dict[str, nn.Module]):
        if not layers:
            raise ValueError("no layers to calibrate: check the include/exclude patterns")
        self.layers = layers
        self.leader_of: dict[str, str] = {}  # layer -> the layer that first saw its input in a forward pass
        self.inputs: dict[str, _InputStats] = {}  # keyed by leader
        self.live: list[tuple[weakref.ref, tuple, str]] = []  # this pass's inputs so far: (tensor, key, leader)

    def _hook(self, args, kwargs, name: str) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        key = _same_data_key(x)
        leader = next((lead for ref, k, lead in self.live if k == key and ref() is not None), None)
        if leader is None:
            leader = name
            self.live.append((weakref.ref(x), key, name))
            self.inputs.setdefault(name, _InputStats(x.shape[-1])).add(x)
        if self.leader_of.setdefault(name, leader) != leader:
            raise RuntimeError(
                f"layer {name} shared its input with {self.leader_of[name]} in one forward pass and with "
                f"{leader} in another: input sharing must be the same in every pass"
            )

    @contextlib.contextmanager
    def hooked(self, names):
        """Record the inputs of these layers while the block runs; call new_pass() between passes."""
        handles = [
            self.layers[name].register_forward_pre_hook(
                lambda m, a, kw, name=name: self._hook(a, kw, name), with_kwargs=True)
            for name in names
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.live.clear()

    def new_pass(self) -> None:
        self.live.clear()

    def table(self, names=None) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
        """(stats rows, {gram_key: float32 Gram}) of these layers (all if None), whose inputs
        must have been seen in full; their accumulators are freed, so a block-by-block caller
        holds one block's at a time. A shared input's layers must all be among `names`."""
        names = list(self.layers) if names is None else names
        unused = [name for name in names if name not in self.leader_of]
        if unused:
            raise ValueError(f"layers never called in the forward pass (exclude them): {unused}")
        order = {name: i for i, name in enumerate(self.layers)}
        # Name each shared input after its first member in module order, not call order.
        members: dict[str, list[str]] = {}
        for name in names:
            members.setdefault(self.leader_of[name], []).append(name)
        gram_key = {name: min(group, key=order.get) for group in members.values() for name in group}

        frames, grams = [], {}
        for name in names:
            acc = self.inputs[self.leader_of[name]]
            key = gram_key[name]
            if key not in grams:
                grams[key] = (acc.gram / acc.tokens).float()
                acc.gram = None  # free each float64 sum once converted: peak memory stays near one set of Grams
            K = acc.sum.shape[0]
            frames.append(
                pd.DataFrame(
                    {
                        "layer": name,
                        "gram_key": key,
                        "channel": np.arange(K),
                        "mean": (acc.sum / acc.tokens).numpy(),
                        "mean_sq": (acc.sum_sq / acc.tokens).numpy(),
                        "absmax": acc.absmax.numpy(),
                        "tokens": acc.tokens,
                    }
                )
            )
        for leader in members:
            del self.inputs[leader]
        return pd.concat(frames, ignore_index=True), grams


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    layers: dict[str, nn.Module],
    sequences: torch.Tensor,
    batch_size: int,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """Per-input-channel mean, mean square, absmax and the Gram matrix of every layer's input.

    The whole model in memory, one forward pass per batch. Returns (stats table with one row per
    layer and input channel, {gram_key: float32 K x K}); see _StatsRecorder for gram_key.
    """
    recorder = _StatsRecorder(layers)
    _check_batch_size(batch_size)
    with recorder.hooked(layers):
        for batch in tqdm(sequences.split(batch_size), desc="calibrate", disable=not progress):
            recorder.new_pass()
            run_model(model, batch)
    return recorder.table()


def collect_stats_streaming(
    model: nn.Module,
    weights,
    layers: dict[str, nn.Module],
    sequences: torch.Tensor,
    batch_size: int,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """collect_stats for a model whose parameters are on the meta device, all results in memory
    (see stream_block_stats, which hands them over block by block)."""
    frames, grams = [], {}
    for frame, block_grams in stream_block_stats(model, weights, layers, sequences, batch_size, progress):
        frames.append(frame)
        grams.update(block_grams)
    return pd.concat(frames, ignore_index=True), grams


@torch.no_grad()
def stream_block_stats(
    model: nn.Module,
    weights,
    layers: dict[str, nn.Module],
    sequences: torch.Tensor,
    batch_size: int,
    progress: bool = True,
):
    """Yield (stats rows, {gram_key: Gram}) block after block, for a model whose parameters are
    on the meta device (sopq.model.load_empty_model); together they equal collect_stats' results.

    One block in memory at a time (sopq.stream.BlockWalk): block i is read from disk, run on
    block i-1's outputs while its layers' statistics are recorded, and released. Peak memory: the weights outside the
    blocks that run before them (embeddings) or one block, whichever is larger, plus the
    calibration activations (two copies) and one block's statistics: the caller writes each
    block's out before the next is computed.
    The statistics equal collect_stats' up to float rounding (the same operations in the same order).
    """
    recorder = _StatsRecorder(layers)
    _check_batch_size(batch_size)
    with BlockWalk(model, weights, sequences.split(batch_size)) as walk:
        by_block = walk.layers_by_block(layers)
        hidden = walk.inputs
        for i, _ in tqdm(walk.blocks(), total=len(by_block), desc="calibrate (blocks)", disable=not progress):
            names = by_block[i]
            outputs = []
            with recorder.hooked(names):
                for batch, x in enumerate(hidden):
                    recorder.new_pass()
                    outputs.append(walk.run(i, batch, x))
            hidden = outputs
            yield recorder.table(names)


def load_gram(path, gram_key: str) -> torch.Tensor:
    """Read one Gram matrix from a safetensors file without loading the others."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if gram_key not in f.keys():
            raise ValueError(f"Gram matrix {gram_key!r} is not in {path}: rerun calibration for this layer set")
        return f.get_tensor(gram_key)
