"""Speed of the codebook DPs against the dense ones they replaced, measured in the same run.

1. free mode, the DP alone: _contiguous_clusters against the dense bins^2-per-layer DP that
   _free_codebook ran before (kept here, float32 ranking as it was), on a weighted histogram of
   values like the fit's W / s, b = 4..8 at 256 and 512 bins; checks both give the same runs.
2. whole codebook: _free_codebook (bins forced) and _fp8_codebook against the versions in a
   baseline revision of sopq/quantize.py read from git, on 2^18 values.
3. scaling: time and candidates tried by the new DP at 256..2048 bins; candidates per bin and
   layer stay ~flat (the bound is DP_BRANCHING * log(bins)).

Single-threaded (torch and numpy). Timings are the minimum of --repeats runs, old and new
alternating.

    PYTHONPATH=$PWD python bench/bench_codebook_dp.py --baseline 0b61b94
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
import types
from datetime import datetime, timezone

import numpy as np
import torch

import sopq.quantize as quantize


def dense_clusters(c0, c1, c2, size):
    """The DP _free_codebook ran before: every (start, end) pair of bins for every layer."""
    c0, c1, c2 = (torch.from_numpy(c) for c in (c0, c1, c2))
    m = c0.numel() - 1
    i = torch.arange(m).unsqueeze(1)
    j = torch.arange(m).unsqueeze(0)
    w = c0[j + 1] - c0[i]
    cost = ((c2[j + 1] - c2[i]) - (c1[j + 1] - c1[i]) ** 2 / w.clamp(min=1e-300)).clamp(min=0)
    cost = torch.where(i <= j, cost, torch.inf)
    best = cost[0].float()
    split = torch.zeros(size, m, dtype=torch.long)
    tail_cost = cost[1:].float().contiguous()
    for c in range(1, size):
        best, start = (best[:-1, None] + tail_cost).min(0)
        split[c] = start + 1
    edges, end = [m], m - 1
    for c in range(size - 1, 0, -1):
        edges.append(int(split[c, end]))
        end = edges[-1] - 1
    edges.append(0)
    return np.array(edges[::-1])


def run_sse(c0, c1, c2, edges):
    """Total weighted SSE of the runs of bins between consecutive edges, in float64."""
    a, b = edges[:-1], edges[1:]
    return float(np.sum((c2[b] - c2[a]) - (c1[b] - c1[a]) ** 2 / (c0[b] - c0[a])))


def scaled_weights(n, seed):
    """Like the fit's u = W / s: Gaussian weights over their group-of-32 absmax, and weights
    h_k s^2 spread over two orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.randn(n // 32, 32, generator=g, dtype=torch.float64)
    values = (groups / groups.abs().amax(1, keepdim=True)).flatten()
    weights = torch.rand(n, generator=g, dtype=torch.float64) ** 2 + 0.01
    return values, weights


def prefix_sums(values, weights, bins):
    lo, hi = values.min().item(), values.max().item()
    idx = ((values - lo) * (bins / (hi - lo))).long().clamp_(0, bins - 1)
    sums = [torch.bincount(idx, weights=weights * values**p, minlength=bins) for p in (0, 1, 2)]
    occupied = sums[0] > 0
    return [torch.cat([torch.zeros(1, dtype=torch.float64), s[occupied].cumsum(0)]).numpy() for s in sums]


def best_of(repeats, *fns):
    times = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[k] = min(times[k], time.perf_counter() - start)
    return times


def baseline_module(rev):
    source = subprocess.run(["git", "show", f"{rev}:sopq/quantize.py"], check=True, capture_output=True, text=True).stdout
    module = types.ModuleType("quantize_baseline")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:sopq/quantize.py", "exec"), module.__dict__)
    return module


def with_bins(module, bins, fn):
    saved = module.MIN_HISTOGRAM_BINS, module.MAX_HISTOGRAM_BINS
    module.MIN_HISTOGRAM_BINS = module.MAX_HISTOGRAM_BINS = bins
    try:
        return fn()
    finally:
        module.MIN_HISTOGRAM_BINS, module.MAX_HISTOGRAM_BINS = saved


def counted_candidates(c0, c1, c2, size):
    """Candidates (t, j) the new DP tries, summed over layers."""
    tried = 0
    plain = quantize._monotone_min_plus

    def counting(prev, cost, prev_split):
        def cost_counted(t, j):
            nonlocal tried
            tried += t.size
            return cost(t, j)
        return plain(prev, cost_counted, prev_split)

    quantize._monotone_min_plus = counting
    try:
        quantize._contiguous_clusters(c0, c1, c2, size)
    finally:
        quantize._monotone_min_plus = plain
    return tried


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="0b61b94", help="git revision with the dense DPs")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, numpy {np.__version__}, 1 thread, best of {args.repeats}")

    values, weights = scaled_weights(1 << 18, seed=0)
    print("\n## free-mode DP alone (same histogram for both)\n")
    print("| b | bins | dense ms | new ms | new/dense | same runs | SSE new/dense - 1 |\n|---|---|---|---|---|---|---|")
    for bins in (256, 512):
        c0, c1, c2 = prefix_sums(values, weights, bins)
        for bits in range(4, 9):
            size = 2**bits
            if size >= c0.size - 1:  # _free_codebook takes every bin's mean, no DP
                continue
            dense, new_edges = dense_clusters(c0, c1, c2, size), quantize._contiguous_clusters(c0, c1, c2, size)
            gap = run_sse(c0, c1, c2, new_edges) / run_sse(c0, c1, c2, dense) - 1
            old, new = best_of(args.repeats, lambda: dense_clusters(c0, c1, c2, size),
                               lambda: quantize._contiguous_clusters(c0, c1, c2, size))
            print(f"| {bits} | {c0.size - 1} | {old * 1e3:.2f} | {new * 1e3:.2f} | {new / old:.2f} | "
                  f"{np.array_equal(dense, new_edges)} | {gap:.1e} |")

    base = baseline_module(args.baseline)
    print(f"\n## whole codebook on 2^18 values, against {args.baseline}\n")
    print("| mode | b | bins | baseline ms | new ms | new/baseline | identical |\n|---|---|---|---|---|---|---|")
    for bins in (256, 512):
        for bits in range(4, 9):
            size = 2**bits
            fns = [lambda m=m: with_bins(m, bins, lambda: m._free_codebook(values, weights, size)) for m in (base, quantize)]
            same = torch.equal(fns[0](), fns[1]())
            old, new = best_of(args.repeats, *fns)
            print(f"| free | {bits} | {bins} | {old * 1e3:.1f} | {new * 1e3:.1f} | {new / old:.2f} | {same} |")
    scaled = values * quantize.FP8_E4M3_MAX  # as the fp8 fit's absmax scales map them
    for bits in range(4, 8):  # b = 8 takes every E4M3 value, no DP
        size = 2**bits
        fns = [lambda m=m: m._fp8_codebook(scaled, weights, size) for m in (base, quantize)]
        same = torch.equal(fns[0](), fns[1]())
        old, new = best_of(args.repeats, *fns)
        print(f"| fp8 | {bits} | 253 values | {old * 1e3:.1f} | {new * 1e3:.1f} | {new / old:.2f} | {same} |")

    print("\n## scaling of the new DP in bins\n")
    print("| b | bins | ms | candidates | per bin and layer |\n|---|---|---|---|---|")
    for bits in (6, 8):
        size = 2**bits
        for bins in (256, 512, 1024, 2048):
            c0, c1, c2 = prefix_sums(values, weights, bins)
            m = c0.size - 1
            (new,) = best_of(args.repeats, lambda: quantize._contiguous_clusters(c0, c1, c2, size))
            tried = counted_candidates(c0, c1, c2, size)
            print(f"| {bits} | {m} | {new * 1e3:.2f} | {tried} | {tried / (m * (size - 1)):.1f} |")


if __name__ == "__main__":
    main()
