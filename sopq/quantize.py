"""SOP layer quantization: activation-weighted codebook, group scales, GPTQ-style error feedback.

A layer W (N x K) becomes `W_hat[n, k] = s[n, k // g] * C[q[n, k]]` (see sopq.packing.dequantize).
The fit minimises the output error `tr(dW H dW^T)`: scales and codebook alternate under the
diagonal weighting `h = diag(H)`, then error feedback picks codes column by column against the
full Gram matrix H with the codebook and scales held fixed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sopq.formats import decode_scales, encode_scales, num_groups, round_scales
from sopq.packing import dequantize

# Histogram resolution of the 1-D clustering: the DP is exact over bins; items in one bin share a
# cluster, so finer bins approach the exact optimum at O(bins^2 * 2^b) cost. The cap keeps b = 8
# affordable (2 bins per code there); the Lloyd steps on the raw values then refine the entries.
MIN_HISTOGRAM_BINS = 256
MAX_HISTOGRAM_BINS = 512
BINS_PER_CODE = 4
# Candidate multipliers of the current scale tried per group in the clipping search. On
# all-MiniLM-L6-v2, 11 candidates and 2 alternations changed E_out by under 2% against this.
# E8M0 scales are powers of two: multipliers within 0.8..1.2 all round back to the same scale.
SCALE_SEARCH = {"fp16": (0.8, 0.9, 1.0, 1.1, 1.2), "bf16": (0.8, 0.9, 1.0, 1.1, 1.2), "e8m0": (0.5, 1.0, 2.0)}


@dataclass
class QuantizedLayer:
    codebook: torch.Tensor  # (2^b,) float16, sorted ascending
    scales: torch.Tensor  # (N, G) in the storage dtype of scale_format
    codes: torch.Tensor  # (N, K) uint8
    bits: int
    group: int
    scale_format: str

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.codebook.float(), decode_scales(self.scales, self.scale_format), self.group)


def weighted_codebook(values: torch.Tensor, weights: torch.Tensor, size: int) -> torch.Tensor:
    """Codebook of `size` entries minimising sum(weights * (values - nearest entry)^2).

    The optimal partition of a weighted histogram into contiguous clusters (1-D optimal clusters
    are intervals), found exactly by dynamic programming; it is optimal for the values only as
    far as values sharing a bin may share a cluster (bins are capped, 2 per entry at b = 8).
    A few Lloyd steps on the raw values follow, which can only lower the objective. Returns a
    sorted float64 tensor.
    """
    v = values.flatten().double()
    w = weights.flatten().double()
    keep = w > 0
    v, w = v[keep], w[keep]
    if v.numel() == 0:
        raise ValueError("weighted_codebook: every weight is zero; the layer has no calibrated input")
    lo, hi = v.min().item(), v.max().item()
    bins = min(max(MIN_HISTOGRAM_BINS, BINS_PER_CODE * size), MAX_HISTOGRAM_BINS)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    idx = torch.bucketize(v, edges[1:-1])
    s0 = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, w)
    s1 = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, w * v)
    s2 = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, w * v * v)
    occupied = s0 > 0
    s0, s1, s2 = s0[occupied], s1[occupied], s2[occupied]
    m = s0.numel()
    if m <= size:
        centers = s1 / s0
        return torch.cat([centers, centers[-1:].expand(size - m)]).sort().values

    c0, c1, c2 = (torch.cat([torch.zeros(1, dtype=torch.float64), t.cumsum(0)]) for t in (s0, s1, s2))
    # cost[i, j]: weighted SSE of bins i..j (inclusive) around their weighted mean; inf for i > j.
    i = torch.arange(m).unsqueeze(1)
    j = torch.arange(m).unsqueeze(0)
    tw = c0[j + 1] - c0[i]
    cost = (c2[j + 1] - c2[i]) - (c1[j + 1] - c1[i]) ** 2 / tw.clamp(min=1e-300)
    cost = torch.where(i <= j, cost.clamp(min=0), torch.inf)
    best = cost[0].clone()  # best[j]: optimal cost of bins 0..j in one cluster
    split = torch.zeros(size, m, dtype=torch.long)
    # float32 is plenty to rank candidate splits and halves the memory traffic of the loop.
    best = best.float()
    tail_cost = cost[1:].float().contiguous()
    for c in range(1, size):
        # Cluster c starts at bin i >= 1; the previous c clusters cover bins 0..i-1.
        best, start = (best[:-1, None] + tail_cost).min(0)
        split[c] = start + 1
    # Walk the split points back from the last bin.
    bounds, end = [], m - 1
    for c in range(size - 1, 0, -1):
        start = split[c, end].item()
        bounds.append((start, end))
        end = start - 1
    bounds.append((0, end))
    centers = torch.tensor([(c1[b + 1] - c1[a]) / (c0[b + 1] - c0[a]) for a, b in reversed(bounds)])
    return lloyd_refine(v, w, centers.sort().values)


def lloyd_refine(v: torch.Tensor, w: torch.Tensor, centers: torch.Tensor, steps: int = 4) -> torch.Tensor:
    for _ in range(steps):
        q = nearest_code(v, centers)
        mass = torch.zeros_like(centers).index_add_(0, q, w)
        moment = torch.zeros_like(centers).index_add_(0, q, w * v)
        centers = torch.where(mass > 0, moment / mass.clamp(min=1e-300), centers).sort().values
    return centers


def nearest_code(u: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted codebook for every element of u."""
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(u.to(codebook.dtype), midpoints)


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """(N, K) -> (N, G, group), zero-padding a partial last group."""
    n, k = x.shape
    pad = num_groups(k, group) * group - k
    return torch.nn.functional.pad(x, (0, pad)).reshape(n, -1, group)


def _group_error(w_g, h_g, s, codebook):
    """Weighted squared error per (row, group) when group scale is s (N, G)."""
    u = w_g / s.unsqueeze(-1)
    q = nearest_code(u, codebook)
    err = w_g - s.unsqueeze(-1) * codebook[q].to(w_g.dtype)
    return (h_g * err * err).sum(-1)


def fit_scales_and_codebook(W, h, bits, group, scale_format, iterations=1):
    """Alternate (a) the weighted codebook given scales and (b) a per-group clipping search of the
    scales given the codebook, then refit the codebook to the final scales. Returns (codebook as
    sorted float32 values of its fp16 entries, stored scales)."""
    # float32 is ample for choosing scales and codes; the codebook DP accumulates in float64.
    W = W.float()
    h = h.float().clamp(min=0)
    w_g = _grouped(W, group)
    h_g = _grouped(h.unsqueeze(0), group).expand_as(w_g)

    def codebook_for(scales):
        # The objective in u = W / s is sum h_k s^2 (u - C[q])^2; entries are stored as fp16.
        s = scales.unsqueeze(-1)
        return weighted_codebook(w_g / s, h_g * s**2, 2**bits).half().float()

    # A row group of zeros gets the smallest positive scale: its codes decode to ~0 anyway.
    scales = round_scales(w_g.abs().amax(-1).clamp(min=1e-8), scale_format)
    for _ in range(iterations):
        codebook = codebook_for(scales)
        candidates = torch.stack([round_scales(scales * c, scale_format) for c in SCALE_SEARCH[scale_format]])
        errors = torch.stack([_group_error(w_g, h_g, cand, codebook) for cand in candidates])
        scales = candidates.gather(0, errors.argmin(0).unsqueeze(0)).squeeze(0)
    return codebook_for(scales), encode_scales(scales, scale_format)


def error_feedback_codes(W, H, codebook, scales, group, damp=0.01, block=128):
    """GPTQ-style code choice: codebook and scales fixed, codes picked column by column, each
    column's rounding error pushed onto the columns not yet quantized through the inverse Gram
    matrix (Cholesky factor), which minimises ||(W - W_hat) X|| greedily."""
    W = W.float().clone()
    H = H.double().clone()
    n, k = W.shape
    # Inputs never active in calibration carry no error signal: a unit diagonal keeps H invertible.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += damp * torch.diag(H).mean() * torch.eye(k, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
    s_cols = scales.float().repeat_interleave(group, dim=1)[:, :k]
    codebook = codebook.float()
    codes = torch.empty(n, k, dtype=torch.uint8)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            s = s_cols[:, i1 + i]
            q = nearest_code(col / s, codebook)
            codes[:, i1 + i] = q.to(torch.uint8)
            err = (col - s * codebook[q]) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    return codes


def quantize_layer(W, H, bits, group, scale_format, error_feedback=True, iterations=1) -> QuantizedLayer:
    """Fit one layer. W: (N, K) weight; H: (K, K) Gram matrix of its inputs."""
    if not torch.isfinite(W).all():
        raise ValueError("weight has NaN or Inf entries; fix or exclude this layer before quantizing")
    if group <= 0:
        raise ValueError(f"group size must be positive, got {group}")
    group = min(group, W.shape[1])
    h = torch.diagonal(H)
    codebook, stored = fit_scales_and_codebook(W, h, bits, group, scale_format, iterations)
    scales = decode_scales(stored, scale_format)
    if error_feedback:
        codes = error_feedback_codes(W, H, codebook, scales, group)
    else:
        s_full = scales.repeat_interleave(group, dim=1)[:, : W.shape[1]]
        codes = nearest_code(W.float() / s_full, codebook).to(torch.uint8)
    return QuantizedLayer(codebook.half(), stored, codes, bits, group, scale_format)
