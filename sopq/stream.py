"""Run a model one block at a time, GPTQ-style, with its weights read from disk block by block.

Shared by calibration, evaluation and importance: peak memory is one block's weights (or the
weights outside the blocks, whichever is larger) plus the activations the caller keeps.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .malloc import FLAT_MMAP_THRESHOLD, set_malloc_maps, trim_heap
from .model import run_model


def hidden_states(block_output) -> torch.Tensor:
    return block_output[0] if isinstance(block_output, (tuple, list)) else block_output


def model_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of repeated blocks: its largest ModuleList."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no stack of blocks (ModuleList): use calibration.streaming: false")
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


class _StopForward(Exception):
    pass


class BlockWalk:
    """A model whose parameters are on the meta device (sopq.model.load_empty_model), run block
    by block on cached inputs.

    The constructor runs the model once per batch up to its blocks: the modules before them
    (embeddings) are read from disk when called and released afterwards; block 0 runs for real
    (its outputs tell the form the model expects from a block: a tensor or a tuple), the blocks
    after it are stubs that record the arguments the model gives every block besides the hidden
    states (masks, position embeddings: they may differ between blocks), and the pass stops
    after the last block. `inputs` are block 0's inputs, per batch. Then `blocks()` reads one
    block at a time and `run` applies it; `model_output` runs what follows the blocks (final
    norm, head) on the last block's outputs. Use as a context manager, so that every weight
    goes back to the meta device at the end, also on errors.
    """

    def __init__(self, model: nn.Module, weights, batches: list[torch.Tensor], mmap_threshold: int | None = FLAT_MMAP_THRESHOLD):
        set_malloc_maps(mmap_threshold)
        self.model, self.weights, self.batches = model, weights, list(batches)
        prefix, self.stack = model_blocks(model)
        self.prefixes = [f"{prefix}.{i}." for i in range(len(self.stack))]
        in_blocks = {id(m) for m in self.stack.modules()}
        self._outer = [m for m in model.modules() if id(m) not in in_blocks and list(m.parameters(recurse=False))]
        self._block_args: list[list[tuple]] = [[] for _ in self.stack]  # per block, per batch: (args, kwargs)
        self.inputs: list[torch.Tensor] = []
        self._output_form = None  # one output of block 0, whose form the stubs of model_output copy
        weights.materialize(model, self.stack[0])  # kept: block 0 is also the first of blocks()
        try:
            with self._outer_read_on_call(), self._stubbed(self._capture):
                for batch in self.batches:
                    try:
                        run_model(model, batch)
                    except _StopForward:
                        pass
        except BaseException:
            self.close()
            raise
        for module in self._outer:
            weights.release(module, recurse=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for module in [*self._outer, self.stack]:
            self.weights.release(module)

    def _capture(self, i: int, hidden, args, kwargs):
        self._block_args[i].append((args, kwargs))
        if i == 0:
            self.inputs.append(hidden)
            self._output_form = self.stack[0].__class__.forward(self.stack[0], hidden, *args, **kwargs)
        if i == len(self.stack) - 1:
            raise _StopForward
        return self._output_form  # blocks after the first pass on block 0's output: only their arguments matter

    @contextlib.contextmanager
    def _stubbed(self, stub):
        """Every block's forward replaced by stub(i, hidden_states, args, kwargs)."""
        for i, block in enumerate(self.stack):
            block.forward = lambda hidden, *args, i=i, **kwargs: stub(i, hidden, args, kwargs)
        try:
            yield
        finally:
            for block in self.stack:
                del block.forward

    @contextlib.contextmanager
    def _outer_read_on_call(self):
        """Modules outside the blocks read from disk when first called; those never called
        (the head, in the first pass) are never read."""
        handles = [m.register_forward_pre_hook(lambda m, a: self.weights.materialize(self.model, m, recurse=False))
                   for m in self._outer]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def layers_by_block(self, layers) -> list[list[str]]:
        """The names of `layers` in each block, in their order; a layer outside every block cannot be run."""
        outside = [name for name in layers if not any(name.startswith(p) for p in self.prefixes)]
        if outside:
            raise ValueError(f"layers outside the model's blocks cannot be run block by block: {outside}; "
                             "exclude them (calibration: or use calibration.streaming: false)")
        return [[name for name in layers if name.startswith(p)] for p in self.prefixes]

    def blocks(self, reverse: bool = False):
        """Yield (i, block) with the block's weights read, first to last (or last to first, for
        a backward pass); each is released when the caller moves on."""
        order = list(enumerate(self.stack))
        for i, block in reversed(order) if reverse else order:
            self.weights.materialize(self.model, block)
            try:
                yield i, block
            finally:
                self.weights.release(block)
                trim_heap()

    def run(self, i: int, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block i (read by blocks()) on `hidden`, with the arguments the model gave it for batch `batch`."""
        args, kwargs = self._block_args[i][batch]
        return hidden_states(self.stack[i](hidden, *args, **kwargs))

    def model_output(self, batch: int, last_hidden: torch.Tensor, sequences: slice = slice(None)):
        """The model's output for the `sequences` of batch `batch` when its last block returns
        `last_hidden` for them. The modules outside the blocks are read on first use and kept
        until close()."""
        form = self._output_form
        output = (last_hidden, *form[1:]) if isinstance(form, (tuple, list)) else last_hidden
        with self._outer_read_on_call(), self._stubbed(lambda *_: output):
            return run_model(self.model, self.batches[batch][sequences])
