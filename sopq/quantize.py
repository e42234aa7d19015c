"""SOP layer quantization: activation-weighted codebook, group scales, GPTQ-style error feedback.

A layer W (N x K) becomes `W_hat[n, k] = s[n, k // g] * C[q[n, k]]` (see sopq.packing.dequantize).
The fit minimises the output error `tr(dW H dW^T)`: scales and codebook alternate under the
diagonal weighting `h = diag(H)` until the objective stops falling, then error feedback picks
codes column by column against the full Gram matrix H with the codebook and scales held fixed,
and the codebook is refitted to the final codes when that lowers the output error.

Codebook modes: `free` (fp16 entries) and `fp8` (every entry a finite FP8 E4M3 value).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg.lapack import strtri

from sopq.formats import FP8_E4M3_MAX, decode_scales, encode_scales, num_groups, round_scales
from sopq.packing import dequantize, per_weight

MODES = ("free", "fp8")
# Histogram resolution of the free-mode clustering: BINS_PER_CODE bins per entry within
# [MIN_HISTOGRAM_BINS, MAX_HISTOGRAM_BINS]. The DP is exact over the bins (values in one bin share
# a cluster) at ~bins log(bins) * 2^b cost (see _monotone_min_plus); Lloyd steps on the raw
# values then refine the entries below bin width.
MIN_HISTOGRAM_BINS = 256
MAX_HISTOGRAM_BINS = 512
BINS_PER_CODE = 4
LLOYD_STEPS = 2
# Rows of a DP layer solved per pass of _monotone_min_plus grow by this factor: larger means fewer
# passes (numpy calls per layer) but more candidates tried per row. 8 was fastest of 2, 4, 8, 16
# at 256..2048 bins (bench/RESULTS-codebook-dp.md).
DP_BRANCHING = 8
# Candidate multipliers of the current scale tried per group in the clipping search.
# E8M0 scales are powers of two: multipliers within 0.8..1.2 all round back to the same scale.
SCALE_SEARCH = {"fp16": (0.8, 0.9, 1.0, 1.1, 1.2), "bf16": (0.8, 0.9, 1.0, 1.1, 1.2), "e8m0": (0.5, 1.0, 2.0)}
# Alternation of scales and codebook stops when the weighted error falls by less than this
# fraction, or after max_alternations rounds. On SmolLM2 layers (b = 4, 6) 2 rounds cost ~1.3x
# one round and lower E_out 1-6%; 4 rounds lower it another 1-4% at ~1.5x the cost of 2.
ALTERNATION_TOL = 1e-3
MAX_ALTERNATIONS = 2
# Upper bound of the nearest-code lookup table (see NearestCode).
MAX_LOOKUP_CELLS = 1 << 16
# Weights per block in the clipping search and Lloyd steps (see _group_error).
CHUNK_ELEMENTS = 1 << 16


def _e4m3_grid() -> torch.Tensor:
    """Every finite E4M3 value once, sorted (253 values: +-0 merge, the two NaN codes dropped)."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return values[torch.isfinite(values)].unique()


E4M3_VALUES = _e4m3_grid()


@dataclass
class QuantizedLayer:
    codebook: torch.Tensor  # (2^b,) float16, sorted ascending
    scales: torch.Tensor  # (N, G) in the storage dtype of scale_format
    codes: torch.Tensor  # (N, K) uint8
    bits: int
    group: int
    scale_format: str
    # The codebook as fitted with the scales, before error feedback and the refit after it (the
    # same as codebook without error feedback); None where not kept (packed files). With the
    # scales it gives this fit without error feedback (without_error_feedback).
    fitted_codebook: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.codebook.float(), decode_scales(self.scales, self.scale_format), self.group)


class NearestCode:
    """Index of the nearest entry of a sorted codebook (ties to the lower), built once per codebook.

    Same result as bucketize against the midpoints except for values within float rounding of a
    midpoint (exact ties either way), and several times cheaper: a uniform lookup table over the
    midpoints' span with cells at most half as wide as the closest two distinct midpoints, so each
    cell holds at most one distinct midpoint and one comparison finishes the search. Repeated
    entries (a codebook with fewer distinct values than codes, common on GGUF sources whose
    weights sit on a coarse grid) repeat a midpoint: passing it counts all its copies at once.
    Midpoints too close for the table fall back to bucketize."""

    def __init__(self, codebook: torch.Tensor):
        self.dtype = codebook.dtype
        self.midpoints = (codebook[1:] + codebook[:-1]) / 2
        self.lut = None
        distinct = torch.unique_consecutive(self.midpoints)
        if distinct.numel() < 2:
            return
        lo, hi = distinct[0].item(), distinct[-1].item()
        gap = (distinct[1:] - distinct[:-1]).min().item()
        if not (hi - lo) / gap <= MAX_LOOKUP_CELLS / 2:  # also false for NaN
            return
        cells = int((hi - lo) / gap * 2) + 2
        per_cell = (cells - 1) / (hi - lo)
        if not per_cell < torch.finfo(self.dtype).max:  # a span of subnormals
            return
        self.lo, self.per_cell, self.cells = lo, per_cell, cells
        left_edges = lo + torch.arange(cells, dtype=self.dtype) / self.per_cell
        # lut[c]: midpoints below the left edge of cell c; inner[c]: the first midpoint at or
        # above that edge (+inf past the last one); past[c]: midpoints at or below inner[c].
        self.lut = torch.bucketize(left_edges, self.midpoints)
        self.inner = torch.cat([self.midpoints, torch.full((1,), torch.inf, dtype=self.dtype)])[self.lut]
        self.past = torch.bucketize(self.inner, self.midpoints, right=True)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        u = u.to(self.dtype)
        if self.lut is None:
            return torch.bucketize(u, self.midpoints)
        # Values below the first cell land in cell 0, whose count is 0 and whose midpoint is the
        # first one; values past the last cell in the last cell, likewise.
        # int32 cells and index_select: several times cheaper than int64 advanced indexing.
        cell = (u - self.lo).mul_(self.per_cell).clamp_(0, self.cells - 1).to(torch.int32).flatten()
        above = u.flatten() > self.inner.index_select(0, cell)
        return torch.where(above, self.past.index_select(0, cell), self.lut.index_select(0, cell)).view(u.shape)


@functools.lru_cache(maxsize=16)
def _dp_passes(rows: int) -> tuple[tuple[np.ndarray, ...], ...]:
    """The passes of _monotone_min_plus over rows 1..rows-1: (rows solved, the nearest rows solved
    before on their left, on their right, rows - 1), every DP_BRANCHING**r-th row first, r falling."""
    n = rows - 1
    stride = 1
    while stride * DP_BRANCHING <= n:
        stride *= DP_BRANCHING
    passes = []
    while stride >= 1:
        step = stride * DP_BRANCHING
        solved = np.arange(stride, n + 1, stride)
        solved = solved[solved % step != 0]
        left = solved - solved % step
        passes.append((solved, left, left + step, solved - 1))
        stride //= DP_BRANCHING
    return tuple(passes)


def _monotone_min_plus(prev: np.ndarray, cost, prev_split: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One layer of a DP whose cost satisfies the quadrangle inequality (Monge):
    best[j] = min over t < j of prev[t] + cost(t, j), split[j] the smallest such t (best[0] = inf).

    Monge makes split nondecreasing in j, and no smaller than the previous layer's split at j
    (prev_split). So rows are solved in passes, every DP_BRANCHING**r-th row first: a row only
    tries the t between the splits of the nearest solved rows around it, at least prev_split.
    A pass tries O(DP_BRANCHING * rows) candidates, batched in numpy, over log(rows) passes,
    instead of every (t, j) pair. `cost` takes int arrays t, j and returns float64 values."""
    size = prev.size
    best = np.full(size, np.inf)
    split = np.zeros(size, dtype=np.int64)
    passes = _dp_passes(size)
    # split of rows 1..size-1 as solved so far; the edges: 0 on the left, past the end on the right.
    bound = np.full(passes[0][2][-1] + 1, size, dtype=np.int64)
    bound[0] = 0
    for rows, left, right, last_candidate in passes:
        hi = np.minimum(bound[right], last_candidate)
        # A row with too few items for this layer has only infinite candidates and its window
        # bounds nothing that matters; the minimum keeps its window non-empty.
        lo = np.minimum(np.maximum(bound[left], prev_split[rows]), hi)
        counts = hi - lo + 1
        ends = counts.cumsum()
        starts = ends - counts
        t = np.arange(ends[-1]) - np.repeat(starts - lo, counts)
        values = prev[t] + cost(t, np.repeat(rows, counts))
        row_min = np.minimum.reduceat(values, starts)
        at_min = np.flatnonzero(values == np.repeat(row_min, counts))
        bound[rows] = t[at_min[np.searchsorted(at_min, starts)]]
        best[rows] = row_min
    split[1:] = bound[1:size]
    return best, split


def _free_codebook(v, w, size):
    """Contiguous-cluster DP over a uniform weighted histogram, then Lloyd steps on the values."""
    lo, hi = v.min().item(), v.max().item()
    bins = min(max(MIN_HISTOGRAM_BINS, BINS_PER_CODE * size), MAX_HISTOGRAM_BINS)
    per_unit = bins / (hi - lo) if hi > lo else 0.0
    idx = ((v - lo) * per_unit).long().clamp_(0, bins - 1)
    s0 = torch.bincount(idx, weights=w, minlength=bins)
    s1 = torch.bincount(idx, weights=w * v, minlength=bins)
    s2 = torch.bincount(idx, weights=w * v * v, minlength=bins)
    occupied = s0 > 0
    s0, s1, s2 = s0[occupied], s1[occupied], s2[occupied]
    m = s0.numel()
    if m <= size:
        centers = s1 / s0
        return torch.cat([centers, centers[-1:].expand(size - m)]).sort().values
    c0, c1, c2 = (torch.cat([torch.zeros(1, dtype=torch.float64), t.cumsum(0)]).numpy() for t in (s0, s1, s2))
    edges = _contiguous_clusters(c0, c1, c2, size)
    centers = (c1[edges[1:]] - c1[edges[:-1]]) / (c0[edges[1:]] - c0[edges[:-1]])
    return lloyd_refine(v, w, torch.from_numpy(centers))


def _contiguous_clusters(c0, c1, c2, size):
    """Edges 0 = e_0 < ... < e_size = m of the `size` runs of bins [e_i, e_i+1) with least total
    weighted SSE around their weighted means, from the prefix sums c0, c1, c2 (m + 1 entries) of
    the bins' weight, weight * value and weight * value^2. The SSE of a run is Monge in its ends."""
    m = c0.size - 1
    sums = np.stack([c0, c1, c2])

    def cost(a, b):  # SSE of bins [a, b), a < b
        weight, moment, square = sums[:, b] - sums[:, a]
        return np.maximum(square - moment * moment / weight, 0)

    # best[j]: least SSE of bins [0, j) in as many runs as the layers so far; splits[c][j]: where
    # the last run starts in it with c + 2 runs.
    best = np.concatenate([[np.inf], cost(np.zeros(m, dtype=np.int64), np.arange(1, m + 1))])
    split = np.zeros(m + 1, dtype=np.int64)
    splits = []
    for _ in range(1, size):
        best, split = _monotone_min_plus(best, cost, split)
        splits.append(split)
    edges = [m]
    for split in reversed(splits):
        edges.append(int(split[edges[-1]]))
    edges.append(0)
    return np.array(edges[::-1])


def _fp8_codebook(v, w, size):
    """`size` finite E4M3 values minimising the weighted SSE of every value to its nearest chosen
    one: exact DP over the candidates (1-D assignment to the nearest of the chosen entries splits
    the sorted values at midpoints, so each gap between two consecutive chosen candidates costs an
    amount computable from prefix sums). That gap cost is Monge: for a <= b <= c <= d, each value
    in (b, c] pays min(|x-a|, |x-c|)^2 + min(|x-b|, |x-d|)^2 <= min(|x-a|, |x-d|)^2 +
    min(|x-b|, |x-c|)^2 (min is supermodular) and the others plainly, so _monotone_min_plus
    solves each layer. Fewer distinct candidates than `size` (b = 8: 253 < 256) gives every
    candidate, the largest repeated."""
    grid = E4M3_VALUES.double()
    m = grid.numel()
    if m <= size:
        return torch.cat([grid, grid[-1:].expand(size - m)])
    order = v.argsort()
    v, w = v[order], w[order]
    c0, c1, c2 = (torch.cat([torch.zeros(1, dtype=torch.float64), t.cumsum(0)]) for t in (w, w * v, w * v * v))

    def to_center(a, b, c):  # sum over items [a, b) of w (v - c)^2
        return ((c2[b] - c2[a]) - 2 * c * (c1[b] - c1[a]) + c * c * (c0[b] - c0[a])).clamp(min=0)

    n = v.numel()
    at = torch.searchsorted(v, grid, right=True)  # items <= grid[j] are [0, at[j])
    head = to_center(torch.zeros_like(at), at, grid)  # items up to candidate j, all to j
    tail = to_center(at, torch.full_like(at, n), grid)  # items above candidate j, all to j
    i = torch.arange(m).unsqueeze(1)
    j = torch.arange(m).unsqueeze(0)
    mid = torch.searchsorted(v, (grid[i] + grid[j]) / 2, right=True)  # ties go to the lower entry
    # pair[i, j]: items in (grid[i], grid[j]] each to the nearer of the two; inf unless i < j.
    pair = to_center(at[i].expand(m, m), mid, grid[i]) + to_center(mid, at[j].expand(m, m), grid[j])
    pair = torch.where(i < j, pair, torch.inf)
    pair = pair.numpy()
    best = head.numpy()
    split = np.zeros(m, dtype=np.int64)
    splits = []
    for _ in range(1, size):
        best, split = _monotone_min_plus(best, lambda a, b: pair[a, b], split)
        splits.append(split)
    chosen = [int(np.argmin(best + tail.numpy()))]
    for split in reversed(splits):
        chosen.append(int(split[chosen[-1]]))
    return grid[sorted(chosen)]


def weighted_codebook(values: torch.Tensor, weights: torch.Tensor, size: int, mode: str = "free") -> torch.Tensor:
    """Codebook of `size` entries minimising sum(weights * (values - nearest entry)^2).

    free: optimal contiguous partition of a weighted histogram (256..512 bins; 1-D
    optimal clusters are intervals), exact as far as values sharing a bin share a cluster, then
    Lloyd steps on the raw values, which can only lower the objective. Cost: one pass over the
    values plus ~bins log(bins) * size for the DP, independent of the number of values.
    fp8: exact over the finite E4M3 values (see _fp8_codebook).
    Returns a sorted float64 tensor.
    """
    if mode not in MODES:
        raise ValueError(f"unknown codebook mode {mode!r}; use one of {MODES}")
    v = values.flatten().double()
    w = weights.flatten().double()
    keep = w > 0
    v, w = v[keep], w[keep]
    if v.numel() == 0:
        raise ValueError("weighted_codebook: every weight is zero; the layer has no calibrated input")
    return _free_codebook(v, w, size) if mode == "free" else _fp8_codebook(v, w, size)


def lloyd_refine(v: torch.Tensor, w: torch.Tensor, centers: torch.Tensor, steps: int = LLOYD_STEPS) -> torch.Tensor:
    """Lloyd steps from sorted centers on values v with weights w, over blocks of CHUNK_ELEMENTS
    values (cheaper: see _group_error)."""
    weighted = w * v
    size = centers.numel()
    for _ in range(steps):
        nearest = NearestCode(centers)
        mass, moment = torch.zeros(size, dtype=w.dtype), torch.zeros(size, dtype=w.dtype)
        for a in range(0, v.numel(), CHUNK_ELEMENTS):
            q = nearest(v[a : a + CHUNK_ELEMENTS])
            mass += torch.bincount(q, weights=w[a : a + CHUNK_ELEMENTS], minlength=size)
            moment += torch.bincount(q, weights=weighted[a : a + CHUNK_ELEMENTS], minlength=size)
        centers = torch.where(mass > 0, moment / mass.clamp(min=1e-300), centers).sort().values
    return centers


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """(N, K) -> (N, G, group), zero-padding a partial last group."""
    n, k = x.shape
    pad = num_groups(k, group) * group - k
    return torch.nn.functional.pad(x, (0, pad)).reshape(n, -1, group)


def _group_error(w_g, h_g, s, codebook):
    """Weighted squared error per (row, group) when group scale is s (N, G). Computed on blocks
    of about CHUNK_ELEMENTS weights: the temporaries then stay in cache, and below the size at
    which every fresh allocation is a new mmap whose page faults cost more than the arithmetic."""
    nearest = NearestCode(codebook)
    rows = max(1, CHUNK_ELEMENTS // w_g[0].numel())
    error = torch.empty(s.shape)
    for r in range(0, s.shape[0], rows):
        w, scale = w_g[r : r + rows], s[r : r + rows].unsqueeze(-1)
        diff = w - scale * codebook[nearest(w / scale)]
        error[r : r + rows] = (h_g[r : r + rows] * diff * diff).sum(-1)
    return error


def _store_codebook(codebook: torch.Tensor, mode: str) -> torch.Tensor:
    """Entries as stored (fp16; fp8-mode entries are E4M3 values, exact in fp16), as float32."""
    return codebook.half().float()


def fit_scales_and_codebook(W, h, bits, group, scale_format, mode="free", max_alternations=MAX_ALTERNATIONS):
    """Alternate (a) the weighted codebook given the scales and (b) a per-group clipping search of
    the scales given the codebook, until the weighted error falls by less than ALTERNATION_TOL.
    Returns (codebook as sorted float32 values of its fp16 entries, stored scales)."""
    W = W.float()
    h = h.float().clamp(min=0)
    w_g = _grouped(W, group)
    h_g = _grouped(h.unsqueeze(0), group).expand_as(w_g)

    def codebook_for(scales, start=None):
        # The objective in u = W / s is sum h_k s^2 (u - C[q])^2. The exact DP runs on the first
        # scales; later free-mode rounds continue from the current codebook with Lloyd steps,
        # which cannot raise the objective and cost a fraction of a DP at b = 7, 8.
        s = scales.unsqueeze(-1)
        values, weights = w_g / s, h_g * s**2
        if start is None or mode != "free":
            return _store_codebook(weighted_codebook(values, weights, 2**bits, mode), mode)
        keep = weights > 0
        return _store_codebook(lloyd_refine(values[keep].double(), weights[keep].double(), start.double()), mode)

    # Start from absmax scales (fp8: the group's absmax maps to E4M3's largest value). A row group
    # of zeros gets the smallest positive scale: its codes decode to ~0 anyway.
    top = FP8_E4M3_MAX if mode == "fp8" else 1.0
    scales = round_scales(w_g.abs().amax(-1).clamp(min=1e-8) / top, scale_format)
    codebook = codebook_for(scales)
    previous = float("inf")
    for _ in range(max_alternations):
        candidates = torch.stack([round_scales(scales * c, scale_format) for c in SCALE_SEARCH[scale_format]])
        errors = torch.stack([_group_error(w_g, h_g, cand, codebook) for cand in candidates])
        best, pick = errors.min(0)
        scales = candidates.gather(0, pick.unsqueeze(0)).squeeze(0)
        objective = best.sum().item()
        refit = codebook_for(scales, codebook)
        refit_objective = _group_error(w_g, h_g, scales, refit).sum().item()
        if refit_objective < objective:  # fp16 rounding of the entries may undo a tiny gain
            codebook, objective = refit, refit_objective
        if objective > previous * (1 - ALTERNATION_TOL) or objective == 0:
            break
        previous = objective
    return codebook, encode_scales(scales, scale_format)


def inverse_cholesky(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Gram matrix, as GPTQ uses it. Depends on H
    only, so one factor serves every width, format and codebook fitted against the same H."""
    H = H.double().clone()
    k = H.shape[0]
    # Inputs never active in calibration carry no error signal: a unit diagonal keeps H invertible.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += damp * torch.diag(H).mean() * torch.eye(k, dtype=H.dtype)
    # One factorization instead of three (Cholesky, inverse, Cholesky of the inverse): with J the
    # reversal permutation and J H J = L L^T, H^-1 = U^T U for U = J L^-1 J, upper triangular
    # with a positive diagonal, hence the upper Cholesky factor of H^-1. In float32, as GPTQ
    # factors (the damping keeps it well conditioned), and L^-1 by LAPACK's triangular inverse
    # (k^3 / 3 flops, a third of a triangular solve against the identity): at K = 4864 this is
    # 1.4 s instead of 3.3 s in float64, and E_out of the fits moves by < 1e-3 relative.
    L = torch.linalg.cholesky(H.flip(0, 1).float())
    L_inv, info = strtri(L.numpy(), lower=1)
    if info != 0:
        raise ValueError(f"inverse_cholesky: the damped Gram matrix's factor is singular (LAPACK info {info})")
    # LAPACK leaves the upper triangle as it was: zeros, as torch's Cholesky factor has there.
    return torch.from_numpy(L_inv).flip(0, 1).contiguous()


def gptq_round(W, hinv_chol, round_column: Callable[[int, torch.Tensor], torch.Tensor], block=128):
    """GPTQ-style rounding: columns rounded one by one by `round_column(k, column) -> rounded
    column` (any fixed grid: a codebook with scales, FP8, INT6 ...), each column's rounding error
    pushed onto the columns not yet rounded through the inverse Gram matrix (its upper Cholesky
    factor, from inverse_cholesky), which minimises ||(W - W_hat) X|| greedily. Returns W_hat."""
    # Work on W^T, so that every step reads and writes contiguous rows instead of strided columns.
    Wt = W.float().T.contiguous()
    k, n = Wt.shape
    Wt_hat = torch.empty_like(Wt)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        E1 = torch.empty(i2 - i1, n)
        Hinv1 = hinv_chol[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = Wt[i1 + i]
            rounded = round_column(i1 + i, col)
            Wt_hat[i1 + i] = rounded
            E1[i] = (col - rounded) / Hinv1[i, i]
            Wt[i1 + i + 1 : i2].addr_(Hinv1[i, i + 1 :], E1[i], alpha=-1)
        Wt[i2:] -= hinv_chol[i1:i2, i2:].T @ E1
    return Wt_hat.T.contiguous()


def _output_error_change(W, before, after, H):
    """E(after) - E(before) for the output error E(X) = tr((W - X) H (W - X)^T), with one matmul:
    for symmetric H it equals tr((before - after) H (2 W - before - after)^T). float32 suffices to
    compare two candidate reconstructions of the same layer."""
    return (((before - after).float() @ H.float()) * (2 * W - before - after).float()).sum().item()


def refit_codebook(W, H, codes, codebook, scales_full):
    """The h-weighted centroid of each code's values u = W / s on the final assignment (the
    free-mode codebook step, with the assignment fixed), kept only if the full-H output error
    falls. Returns (codebook, whether it changed)."""
    h = torch.diagonal(H).float().clamp(min=0)
    u = W.float() / scales_full
    weight = (h.unsqueeze(0) * scales_full**2).flatten().double()
    q = codes.long().flatten()
    mass = torch.bincount(q, weights=weight, minlength=codebook.numel())
    moment = torch.bincount(q, weights=weight * u.flatten().double(), minlength=codebook.numel())
    candidate = torch.where(mass > 0, moment / mass.clamp(min=1e-300), codebook.double()).half().float()
    if not torch.all(candidate[1:] >= candidate[:-1]):
        return codebook, False  # a sorted codebook is part of the format
    change = _output_error_change(W, scales_full * codebook[codes.long()], scales_full * candidate[codes.long()], H)
    return (candidate, True) if change < 0 else (codebook, False)


def quantize_layer(
    W, H, bits, group, scale_format, error_feedback=True, mode="free", hinv_chol=None, max_alternations=MAX_ALTERNATIONS
) -> QuantizedLayer:
    """Fit one layer. W: (N, K) weight; H: (K, K) Gram matrix of its inputs; hinv_chol: the
    inverse_cholesky(H) factor when the caller shares it across fits of the same H."""
    if not torch.isfinite(W).all():
        raise ValueError("weight has NaN or Inf entries; fix or exclude this layer before quantizing")
    if group <= 0:
        raise ValueError(f"group size must be positive, got {group}")
    n, k = W.shape
    group = min(group, k)
    fitted, stored = fit_scales_and_codebook(W, torch.diagonal(H), bits, group, scale_format, mode, max_alternations)
    codebook = fitted
    s_full = _full_scales(stored, scale_format, group, k)
    nearest = NearestCode(codebook)
    codes = nearest(W.float() / s_full)
    # A grid that reproduces W exactly (common on GGUF sources, whose weights sit on a coarse
    # grid) leaves error feedback no error to feed back and the refit no error to lower.
    if error_feedback and not torch.equal(s_full * codebook[codes], W.float()):
        if hinv_chol is None:
            hinv_chol = inverse_cholesky(H)
        s_columns = s_full.T.contiguous()
        W_hat = gptq_round(W, hinv_chol, lambda i, col: s_columns[i] * codebook[nearest(col / s_columns[i])])
        # W_hat / s lands on codebook entries (to float rounding): the nearest entry gives the codes.
        codes = nearest(W_hat / s_full)
        if mode == "free":
            codebook, _ = refit_codebook(W, H, codes, codebook, s_full)
    return QuantizedLayer(codebook.half(), stored, codes.to(torch.uint8), bits, group, scale_format, fitted.half())


def _full_scales(stored: torch.Tensor, scale_format: str, group: int, k: int) -> torch.Tensor:
    """The stored (N, G) group scales as float32 (N, K), one per weight."""
    return per_weight(decode_scales(stored, scale_format), group, k)


def without_error_feedback(W: torch.Tensor, q: QuantizedLayer) -> QuantizedLayer:
    """The fit quantize_layer(W, H, ..., error_feedback=False) gives with q's settings, from q, a
    fit of the same W and H with error feedback: error feedback keeps the fitted codebook and
    scales (q.fitted_codebook, q.scales), so rounding W to the nearest entries gives the same
    codes, without fitting again."""
    if q.fitted_codebook is None:
        raise ValueError("this fit does not keep its codebook from before error feedback; rerun sensitivity")
    s_full = _full_scales(q.scales, q.scale_format, q.group, W.shape[1])
    codes = NearestCode(q.fitted_codebook.float())(W.float() / s_full)
    return QuantizedLayer(q.fitted_codebook, q.scales, codes.to(torch.uint8), q.bits, q.group, q.scale_format,
                          q.fitted_codebook)
