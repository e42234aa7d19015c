"""End-to-end quality of weight variants against the unquantized model, and per-layer importance.

One harness for every variant (SOP, baselines, the reference), so their numbers are comparable:
same sequences, same batches, same reference outputs.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .model import KINDS, get_weight, run_model, set_weight
from .malloc import HEAP_ONLY
from .stream import BlockWalk


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}: use one of {KINDS}")


def comparable_output(kind: str, out) -> torch.Tensor:
    """What variants are compared on, from the model's output: causal_lm: next-token logits
    (B, S, V); encoder: L2-normalised mean-pooled embeddings (B, D), float64."""
    if kind == "causal_lm":
        return out.logits
    # run_model's attention mask is all ones, so the mask-weighted mean is the plain mean over tokens.
    pooled = out.last_hidden_state.double().mean(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _model_output(model: nn.Module, kind: str, batch: torch.Tensor) -> torch.Tensor:
    return comparable_output(kind, run_model(model, batch))


def _kl(logp_ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(ref || variant) per row, from log-probabilities."""
    return (logp_ref.exp() * (logp_ref - logp)).sum(-1)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a[r, j] * b[r, j] per row, as a batched matmul (a fused reduction, no temporary)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _NextTokenReference:
    """The reference's next-token distributions of one batch, prepared once for comparing any
    number of variants with it (compare).

    Positions 0..S-2 predict tokens 1..S-1. Everything is float64, which keeps small KL values
    exact to ~1e-14: with z the logits, lse their log-sum-exp and p = softmax(z_ref),

        KL(ref || variant) = sum_j p_j (logp_ref_j - logp_j) = (p . z_ref - lse_ref) - (p . z - lse),

    so a variant costs one log-sum-exp and one dot product per row, and the reference's
    softmax is computed once per batch instead of once per variant. Memory: 8 bytes per
    predicted token and vocabulary entry (callers pass batches of a few hundred tokens)."""

    def __init__(self, ref_logits: torch.Tensor, input_ids: torch.Tensor):
        z = ref_logits[:, :-1].reshape(-1, ref_logits.shape[-1])
        self.argmax = z.argmax(-1)
        self.targets = input_ids[:, 1:].reshape(-1, 1)
        # One float64 work buffer for every comparison: a fresh one per variant cost more in page
        # faults (each a new memory map) than the arithmetic on it.
        self._work = torch.empty(z.shape, dtype=torch.float64)
        lse = self._logsumexp(z)
        self.p = z.double().sub_(lse[:, None]).exp_()
        # p . logp_ref, by the same operations as compare's p . logp: the reference's KL is exactly 0.
        self.p_logp = _row_dot(self.p, self._work.copy_(z)) - lse

    def _logsumexp(self, z: torch.Tensor) -> torch.Tensor:
        """Per row, the float64 log-sum-exp of float32 logits z (overwrites the work buffer)."""
        m = z.amax(-1, keepdim=True)
        return m.squeeze(1).double() + self._work.copy_(z).sub_(m).exp_().sum(-1).log()

    def compare(self, logits: torch.Tensor):
        """Per predicted token: NLL of the true next token, KL(ref || variant), argmax agreement."""
        z = logits[:, :-1].reshape(-1, logits.shape[-1])
        agree = z.argmax(-1) == self.argmax  # float32 logits: the same order as their float64 values
        z64 = self._work.copy_(z)
        cross = _row_dot(self.p, z64)
        target = z64.gather(1, self.targets).squeeze(1)
        lse = self._logsumexp(z)
        return lse - target, self.p_logp - (cross - lse), agree


def _one_minus_cosine(ref_emb: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    # For unit vectors 1 - cos = |a - b|^2 / 2: exact 0 for identical inputs and no cancellation near 1.
    return (ref_emb - emb).square().sum(-1) / 2


# Predicted tokens scored per piece of a batch (_NextTokenReference keeps 8 bytes per token and
# vocabulary entry: 0.5 GB at 256 tokens and a 262k vocabulary).
SCORING_TOKENS = 256


def scoring_pieces(batch: torch.Tensor) -> list[slice]:
    """Slices of a batch's sequences (B, S) of about SCORING_TOKENS tokens, one sequence at least."""
    step = max(1, SCORING_TOKENS // batch.shape[1])
    return [slice(i, i + step) for i in range(0, batch.shape[0], step)]


def check_variant_layers(variants: dict[str, dict], layers: dict[str, nn.Module]) -> None:
    for variant, weights in variants.items():
        unknown = sorted(set(weights) - set(layers))
        if unknown:
            raise ValueError(f"variant {variant!r} names layers that are not quantizable layers: {unknown[:5]}")


class EndToEnd:
    """End-to-end metrics of variants against the reference, accumulated batch by batch: one
    harness for the whole-model and the block-by-block evaluation. Per batch, `reference` sets
    the reference's output, then `add` compares each variant's output with it.

    causal_lm columns: variant, ppl, kl_mean, kl_p99 (KL(ref || variant) per next token), top1;
    encoder columns: variant, cosine_mean, cosine_min (pooled embeddings)."""

    def __init__(self, kind: str, variants):
        _check_kind(kind)
        self.kind = kind
        self.per_token = {v: [] for v in variants}  # per batch: (nll, kl, agree) or 1 - cosine
        self._reference = None

    def reference(self, batch: torch.Tensor, ref: torch.Tensor) -> None:
        """One batch's input ids and the reference's comparable_output on it."""
        self._reference = _NextTokenReference(ref, batch) if self.kind == "causal_lm" else ref

    def add(self, variant: str, out: torch.Tensor) -> None:
        """A variant's comparable_output on the batch of the latest `reference`."""
        if self.kind == "causal_lm":
            self.per_token[variant].append(self._reference.compare(out))
        else:
            self.per_token[variant].append(_one_minus_cosine(self._reference, out))

    def table(self) -> pd.DataFrame:
        rows = []
        for variant, batches in self.per_token.items():
            if self.kind == "causal_lm":
                nll, kl, agree = (torch.cat(parts) for parts in zip(*batches))
                token_kl = kl.numpy()
                rows.append({
                    "variant": variant,
                    "ppl": float(nll.mean().exp()),
                    "kl_mean": float(token_kl.mean()),
                    "kl_p99": float(np.percentile(token_kl, 99)),
                    "top1": float(agree.double().mean()),
                })
            else:
                cosine = 1 - torch.cat(batches)
                rows.append({"variant": variant, "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())})
        return pd.DataFrame(rows)


@torch.no_grad()
def evaluate_variants(
    model: nn.Module,
    kind: str,
    layers: dict[str, nn.Module],
    variants: dict[str, dict[str, torch.Tensor]],
    sequences: torch.Tensor,
    batch_size: int,
    progress: bool = True,
) -> pd.DataFrame:
    """Run every variant (layer -> W_hat (N, K); empty = the reference) through the whole model
    in memory and compare with the reference: EndToEnd's table. Original weights are restored
    afterwards, also on errors. (The evaluate stage runs block by block instead, see
    sopq.variants.evaluate_streaming; this is for models in memory, e.g. sopq.load's.)
    """
    _check_kind(kind)
    check_variant_layers(variants, layers)
    touched = {name for weights in variants.values() for name in weights}
    originals = {name: get_weight(layers[name]).clone() for name in touched}
    scores = EndToEnd(kind, variants)
    for batch in tqdm(sequences.split(batch_size), desc="evaluate", disable=not progress):
        ref = _model_output(model, kind, batch)
        scores.reference(batch, ref)
        for variant, weights in variants.items():
            try:
                for name, W_hat in weights.items():
                    set_weight(layers[name], W_hat)
                out = _model_output(model, kind, batch) if weights else ref
            finally:
                for name in weights:
                    set_weight(layers[name], originals[name])
            scores.add(variant, out)
    return scores.table()


def _noise_direction(name: str, shape, seed: int) -> torch.Tensor:
    # Seeded per layer name, so a layer's noise does not depend on which other layers are measured.
    # One 32-bit hash of both: the CPU generator keeps only the low 32 bits of its seed.
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
    return torch.randn(shape, generator=generator)


def _gram(grams, name: str) -> torch.Tensor:
    # One layer's Gram matrix at a time: holding all of them in float64 costs GBs on 0.5B models.
    try:
        return grams[name].double()
    except KeyError:
        raise ValueError(f"no Gram matrix for layer {name}: pass one per layer") from None


def _damage_sum(kind: str, ref: torch.Tensor, logp_ref: torch.Tensor | None, out: torch.Tensor) -> float:
    """Summed KL(ref || out) over next tokens (causal_lm) or 1 - cosine over sequences (encoder)."""
    if kind == "causal_lm":
        return float(_kl(logp_ref, out[:, :-1].float().log_softmax(-1)).sum())
    return float(_one_minus_cosine(ref, out).sum())


def _damage_count(kind: str, batch: torch.Tensor) -> int:
    return batch.shape[0] * (batch.shape[1] - 1) if kind == "causal_lm" else batch.shape[0]


@torch.no_grad()
def measure_layer_importance(
    model: nn.Module,
    kind: str,
    layers: dict[str, nn.Module],
    sequences: torch.Tensor,
    grams: dict[str, torch.Tensor],
    rel_error: float,
    seed: int,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, float]:
    """alpha_l = D_l / rel_error by noise injection: one forward pass per layer and batch.

    Gaussian noise dW, scaled so that tr(dW H dW^T) / tr(W H W^T) = rel_error exactly, is added to one
    layer at a time. D is the mean KL(ref || noisy) per next token (causal_lm) or the mean 1 - cosine
    of pooled embeddings (encoder). HIGGS' linearity says D is close to alpha_l * E_out at small errors.
    `grams` maps each layer name to its Gram matrix (any object indexable by layer name).
    A layer whose output is zero on the calibration inputs (tr(W H W^T) = 0: an all-zero weight,
    or inputs that are always zero) gets alpha 0: relative noise on it is zero noise, and its
    output error is zero at any width.
    """
    _check_kind(kind)
    if not rel_error > 0:
        raise ValueError(f"rel_error must be positive, got {rel_error}")
    noise_scale: dict[str, float] = {}
    for name, module in layers.items():
        H = _gram(grams, name)
        W = get_weight(module).double()
        Z = _noise_direction(name, W.shape, seed).double()
        signal = ((W @ H) * W).sum()
        noise = ((Z @ H) * Z).sum()
        if not (torch.isfinite(signal) and signal >= 0 and noise >= 0):
            raise ValueError(f"layer {name}: tr(W H W^T) = {float(signal)} (a damaged weight or Gram matrix)")
        if signal > 0:
            noise_scale[name] = float((rel_error * signal / noise).sqrt())

    damage = dict.fromkeys(layers, 0.0)
    count = 0
    batches = sequences.split(batch_size)
    with tqdm(total=len(batches) * len(layers), desc="layer importance (noise)", disable=not progress) as bar:
        for batch in batches:
            ref = _model_output(model, kind, batch)
            # Reference log-probs once per batch, not once per layer: the softmax is most of the
            # cost besides the forward pass. float32 is ample at the KL sizes measured here.
            logp_ref = ref[:, :-1].float().log_softmax(-1) if kind == "causal_lm" else None
            for name, module in layers.items():
                if name not in noise_scale:
                    bar.update()
                    continue
                W = get_weight(module).clone()
                try:
                    set_weight(module, W + noise_scale[name] * _noise_direction(name, W.shape, seed))
                    out = _model_output(model, kind, batch)
                finally:
                    set_weight(module, W)
                damage[name] += _damage_sum(kind, ref, logp_ref, out)
                bar.update()
            count += _damage_count(kind, batch)
    return {name: damage[name] / count / rel_error for name in layers}


def probe_layer_importance(
    model: nn.Module,
    kind: str,
    layers: dict[str, nn.Module],
    sequences: torch.Tensor,
    grams: dict[str, torch.Tensor],
    seed: int,
    *,
    n_probes: int = 2,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, float]:
    """alpha_l for every layer at once, from one forward and `n_probes` backward passes per batch.

    The same quantity as `measure_layer_importance`, by its second-order expansion instead of one
    noisy forward pass per layer (which costs hours on 0.5B models here). Both damages vanish to
    first order at the reference, and D(dtheta) ~= 1/2 E_r[(g_r . dtheta)^2] with g_r the gradient
    of a random probe: sum_t log p(y_t) with y_t sampled from the model's own next-token
    distribution (the Fisher identity; causal_lm), or r . e with r ~ N(0, I) on the normalised
    pooled embedding e (encoder, where 1 - cos = |de|^2 / 2). For isotropic noise dW = sigma Z
    in layer l, E_Z[(g . dW)^2] = sigma^2 |g_l|^2, and sigma^2 = rel * tr(W H W^T) / (N tr H) gives
    E_out = rel in expectation, so

        alpha_l = E_r |g_l|^2 * tr(W H W^T) / (2 N tr(H) * count)

    with count the number of next tokens (causal_lm) or sequences (encoder) that D averages over.
    """
    _check_kind(kind)
    _check_probes(n_probes)
    # Per layer scale before the passes, so a missing Gram fails early.
    output_scale = {name: _output_scale(name, get_weight(module), grams) for name, module in layers.items()}
    generator = torch.Generator().manual_seed(seed)
    grad_sq = dict.fromkeys(layers, 0.0)
    count = 0
    params = [layers[name].weight for name in layers]
    for param in params:
        param.requires_grad_(True)
    try:
        for batch in tqdm(sequences.split(batch_size), desc="layer importance (probes)", disable=not progress):
            with torch.enable_grad():
                out = _model_output(model, kind, batch)
                for last, objective in _probe_objectives(kind, out, n_probes, generator):
                    grads = torch.autograd.grad(objective, params, retain_graph=not last)
                    _add_grad_sq(grad_sq, layers, grads, n_probes)
            count += _damage_count(kind, batch)
    finally:
        for param in params:
            param.requires_grad_(False)
    return {name: grad_sq[name] * output_scale[name] / count for name in layers}


def _check_probes(n_probes: int) -> None:
    if n_probes < 1:
        raise ValueError(f"n_probes must be at least 1, got {n_probes}")


def _output_scale(name: str, W: torch.Tensor, grams) -> float:
    """tr(W H W^T) / (2 N tr H): alpha per unit of squared probe gradient (probe_layer_importance)."""
    W, H = W.double(), _gram(grams, name)
    signal, trace_h = float(((W @ H) * W).sum()), float(H.diagonal().sum())
    if not (math.isfinite(signal) and signal >= 0 and trace_h >= 0):
        raise ValueError(f"layer {name}: tr(W H W^T) = {signal}, tr(H) = {trace_h} (a damaged weight or Gram matrix)")
    # A layer with zero output on the calibration inputs: alpha 0, as in measure_layer_importance.
    return signal / (2 * W.shape[0] * trace_h) if signal > 0 else 0.0


def _probe_objectives(kind: str, out: torch.Tensor, n_probes: int, generator: torch.Generator):
    """Yield (is the last probe, objective) for each random probe of one batch's output, drawn
    from `generator` in a fixed order (the same samples whole-model or block by block)."""
    if kind == "causal_lm":
        logp = out[:, :-1].float().log_softmax(-1)
        probs = logp.detach().exp().reshape(-1, logp.shape[-1])
    for probe in range(n_probes):
        if kind == "causal_lm":
            sampled = torch.multinomial(probs, 1, generator=generator).view(logp.shape[:-1] + (1,))
            objective = logp.gather(-1, sampled).sum()
        else:
            objective = (torch.randn(out.shape, generator=generator, dtype=out.dtype) * out).sum()
        yield probe == n_probes - 1, objective


def _add_grad_sq(grad_sq: dict, names, grads, n_probes: int) -> None:
    for name, grad in zip(names, grads):
        grad_sq[name] += float(grad.double().square().sum()) / n_probes


def probe_layer_importance_streaming(
    model: nn.Module,
    weights,
    kind: str,
    layers: dict[str, nn.Module],
    sequences: torch.Tensor,
    grams,
    seed: int,
    *,
    n_probes: int = 2,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, float]:
    """probe_layer_importance for a model whose parameters are on the meta device
    (sopq.model.load_empty_model), one block in memory at a time.

    Backpropagation by hand, block by block: a forward walk (sopq.stream.BlockWalk) keeps every
    block's input; the head gives each probe's gradient with respect to the last block's output
    (the probes drawn in the same order as the whole-model pass); then from the last block to the
    first, the block is read again and recomputed with gradients on its input and its layers'
    weights, each probe's incoming gradient is pushed through it, and its layers' squared
    gradients are summed. Peak memory: one block with its activations, plus every block's input
    (blocks x tokens x hidden size). Equals probe_layer_importance up to float rounding.
    """
    _check_kind(kind)
    _check_probes(n_probes)
    generator = torch.Generator().manual_seed(seed)
    grad_sq = dict.fromkeys(layers, 0.0)
    output_scale = {}
    with torch.no_grad(), BlockWalk(model, weights, sequences.split(batch_size), HEAP_ONLY) as walk:
        by_block = walk.layers_by_block(layers)
        block_inputs = [walk.inputs]
        for i, _ in tqdm(walk.blocks(), total=len(by_block), desc="layer importance (forward)", disable=not progress):
            output_scale.update({name: _output_scale(name, get_weight(layers[name]), grams) for name in by_block[i]})
            block_inputs.append([walk.run(i, b, x) for b, x in enumerate(block_inputs[-1])])
        # Per batch and probe: the gradient of the probe objective with respect to the current block's output.
        grad_out = []
        for b, last_hidden in enumerate(block_inputs.pop()):
            last_hidden = last_hidden.requires_grad_()
            with torch.enable_grad():
                out = comparable_output(kind, walk.model_output(b, last_hidden))
                grad_out.append([torch.autograd.grad(objective, last_hidden, retain_graph=not last)[0]
                                 for last, objective in _probe_objectives(kind, out, n_probes, generator)])
        for i, _ in tqdm(walk.blocks(reverse=True), total=len(by_block), desc="layer importance (backward)",
                         disable=not progress):
            params = [layers[name].weight.requires_grad_() for name in by_block[i]]
            for b, x in enumerate(block_inputs.pop()):
                x = x.requires_grad_()
                with torch.enable_grad():
                    out = walk.run(i, b, x)
                    for probe, g in enumerate(grad_out[b]):
                        grads = torch.autograd.grad(out, [x, *params], grad_outputs=g, retain_graph=probe < n_probes - 1)
                        grad_out[b][probe] = grads[0]
                        _add_grad_sq(grad_sq, by_block[i], grads[1:], n_probes)
    count = sum(_damage_count(kind, batch) for batch in walk.batches)
    return {name: grad_sq[name] * output_scale[name] / count for name in layers}
