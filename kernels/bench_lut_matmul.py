"""Benchmark lut_matmul (6-bit codes, group 128, fp16 scales, fp16 activations) against torch.

For each (N, K) and M: fp16 torch.matmul (cuBLAS), torch._scaled_mm in FP8 E4M3 where the
shape allows, and lut_matmul with its automatic configuration (and, with --sweep, the best of a
small grid of launch configurations, to tune launch_config). Times are medians of
triton.testing.do_bench_cudagraph over a CUDA graph that calls each method once on each of
enough copies of its weights (>= ROTATE_BYTES) that L2 holds none of them between calls, divided
by the number of copies: no Python launch overhead in any method's time. Before timing, every lut_matmul configuration is checked against an fp32
product with W_hat dequantized on the CPU (outputs poisoned with NaN first). --baseline times
another version of kernels/lut_matmul.py (e.g. main's checkout) with its own automatic
configuration in the same run, checked the same way. lut_matmul reads the scales groups-major
(sopq.formats.groups_major), as PackedLinear holds them; the baseline row-major.

    python kernels/bench_lut_matmul.py [--sweep [KERNEL]] [--out results.json] [--baseline path/to/lut_matmul.py]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time

import torch
import triton
import triton.testing
from triton.runtime.errors import OutOfResources

from kernels.lut_matmul import (
    PANEL_MIN_M, WGMMA_MAX_M, WGMMA_RING_MAX_M, LaunchConfig, launch_config, lut_matmul, mma_kernel,
)
from sopq.formats import groups_major, num_groups
from sopq.packing import dequantize, packed_words, unpack_codes

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]
MS = [1, 4, 16, 64, 128, 512, 2048]
BITS, GROUP = 6, 128
ROTATE_BYTES = 256 << 20
# check_error's bound on one element's error, in units of its K terms' root sum of squares.
ELEMENT_TOLERANCE = 2e-2
TARGETS = {1: 2.3, 16: 2.0, 128: 1.2, 2048: 0.85}  # over fp16 on the large shapes (issue 5)

# Swept mma configurations: (block_m, block_n, block_k, num_warps, split_k); block_m 0 is
# launch_config's (the smallest power of two >= M, 16..128). Each takes the tensor-core kernel
# launch_config would take for its block_m (mma_kernel).
MMA_SWEEP = [(0, 64, 128, 4, 1), (0, 64, 128, 4, 2), (0, 64, 128, 4, 4), (0, 64, 128, 4, 8), (0, 32, 128, 2, 4),
             (0, 32, 128, 2, 8), (0, 64, 128, 8, 1), (0, 128, 128, 8, 1), (0, 64, 256, 4, 2), (64, 64, 128, 4, 2)]
PANEL_SWEEP = [16 << 20, 48 << 20]  # decoded panel bytes besides the default (PANEL_BYTES)
# Swept wgmma_ring configurations (16 < M <= WGMMA_RING_MAX_M): (block_n, num_stages, split_k), in
# tiles of launch_config's block_m; block_n 128 is two 64-row blocks of W against each x tile.
RING_SWEEP = [(block_n, 2, split) for block_n in (128, 64) for split in (1, 2, 3, 4, 6, 8, 12)]


def bench_us(fn, graph: bool = False) -> float:
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3


def graph_us(fn, buffers) -> float:
    """Median time per call inside a CUDA graph that calls fn once on every rotating buffer:
    no Python launch overhead, and each call reads weights L2 does not hold."""
    return bench_us(lambda: [fn(b) for b in buffers], graph=True) / len(buffers)


def rotating(make, nbytes: int) -> list:
    return [make() for _ in range(max(1, min(32, math.ceil(ROTATE_BYTES / nbytes))))]


def sweep_configs(m: int, n: int, k: int, kernel: str) -> list[LaunchConfig]:
    """The swept configurations of one kernel, or of all ("all")."""
    block_m = min(max(16, triton.next_power_of_2(m)), 128)
    if kernel == "wgmma_ring":
        if not WGMMA_MAX_M < m <= WGMMA_RING_MAX_M:
            return []
        # At block_m 128 four 32 KB stages leave room for one program per SM only.
        return [LaunchConfig("wgmma_ring", block_m, bn, 128, split, num_stages=stages)
                for bn, stages, split in RING_SWEEP if stages * block_m <= 384]
    if kernel == "wgmma":
        if m > WGMMA_MAX_M:
            return []
        # K splits of 2 tiles (WGMMA_SPLIT_K) and of 4.
        wgmma_block_m = launch_config(m, n, k, BITS, interpreted=False).block_m
        return [LaunchConfig("wgmma", wgmma_block_m, 64, 128, triton.cdiv(k, split)) for split in (256, 512)]
    configs = [LaunchConfig(mma_kernel(bm or block_m), bm or block_m, bn, bk, split, warps)
               for bm, bn, bk, warps, split in MMA_SWEEP if (bm or block_m) <= block_m and m < PANEL_MIN_M]
    # At small M the panel path's time is mostly its decode: a measure of decode throughput.
    configs += [LaunchConfig("panel", 0, 64, 256, panel_rows=max(64, nbytes // (2 * k) // 64 * 64))
                for nbytes in PANEL_SWEEP]
    return [c for c in configs if kernel in ("all", c.kernel)]


def short(config: LaunchConfig) -> str:
    if config.kernel == "panel":
        return f"panel {config.panel_rows} rows"
    stages = "" if config.kernel == "wgmma" else f" p{config.num_stages}"  # the wgmma kernel has no stages
    return f"{config.kernel} {config.block_m}x{config.block_n}x{config.block_k} s{config.split_k} w{config.num_warps}{stages}"


def load_baseline(path: str):
    """Another version of kernels/lut_matmul.py, imported under its own name."""
    spec = importlib.util.spec_from_file_location("baseline_lut_matmul", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench_us(lambda: dst.copy_(src)) * 1e-6)


def check_error(out: torch.Tensor, x: torch.Tensor, w_hat: torch.Tensor, what: str) -> float:
    """Relative error of a product against fp32 x @ W_hat^T; stops the run if it is wrong: as a
    whole (relative error >= 1e-2), or in any element further from the reference than
    ELEMENT_TOLERANCE times the root sum of squares of its K terms. Rounding (fp16 codebook values
    times scales, fp16 output) stays well inside that; a lost partial sum does not (a split of
    256 of K = 28672 is ~9% of it), whereas the norm alone let lost split-K sums through."""
    ref = x.float() @ w_hat.T
    err = ((out.float() - ref).norm() / ref.norm()).item()
    terms = (x.float().square() @ w_hat.square().T).sqrt()
    worst = ((out.float() - ref).abs() / terms.clamp_min(1e-30)).nan_to_num(nan=float("inf")).max().item()
    if not (err < 1e-2 and worst < ELEMENT_TOLERANCE):
        raise SystemExit(f"WRONG: {what} rel err {err}, worst element {worst} of its terms' root sum of squares")
    return err


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", nargs="?", const="all", default=None,
                        help="also time a grid of configurations: of every kernel, or of the one named")
    parser.add_argument("--out", default=None)
    parser.add_argument("--shapes", type=int, default=len(SHAPES))
    parser.add_argument("--shape-index", default=None, help="comma-separated indices into SHAPES (default: the first --shapes)")
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--check-shapes", type=int, default=len(SHAPES), help="check correctness on the first few shapes")
    parser.add_argument("--baseline", default=None, help="another lut_matmul.py to time in the same run")
    args = parser.parse_args()
    baseline = load_baseline(args.baseline) if args.baseline else None
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    print(f"# {props.name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{time.strftime('%Y-%m-%d', time.gmtime())}; copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)")
    rows = []
    indices = list(map(int, args.shape_index.split(","))) if args.shape_index else range(args.shapes)
    for shape_index in indices:
        n, k = SHAPES[shape_index]
        check = shape_index < args.check_shapes
        nw = packed_words(n, k, BITS)
        codebook = torch.randn(2**BITS, device="cuda", generator=gen).half()  # stored codebooks are fp16
        lut_bytes = nw * 4 + n * num_groups(k, GROUP) * 2

        def make_lut():
            words = torch.randint(-2**31, 2**31 - 1, (nw,), dtype=torch.int32, device="cuda", generator=gen)
            scales = (torch.rand(n, num_groups(k, GROUP), device="cuda", generator=gen) * 0.02 + 0.005).half()
            return words, scales

        luts = rotating(make_lut, lut_bytes)
        # lut_matmul gets the scales groups-major, as PackedLinear holds them; --baseline row-major,
        # the layout it was written for.
        luts_gm = [(words, groups_major(scales)) for words, scales in luts]
        fp16 = rotating(lambda: torch.randn(n, k, device="cuda", dtype=torch.float16, generator=gen), n * k * 2)
        fp8 = rotating(lambda: torch.randn(n, k, device="cuda", generator=gen).to(torch.float8_e4m3fn), n * k)
        words0, scales0 = luts[0]
        scales0_gm = luts_gm[0][1]
        if check:
            w_hat = dequantize(unpack_codes(words0.cpu(), BITS, (n, k)), codebook.cpu(), scales0.cpu().float(), GROUP).cuda()
        one = torch.ones((), device="cuda")
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
            t_fp16 = graph_us(lambda w: x @ w.T, fp16)
            x8 = x.to(torch.float8_e4m3fn)
            try:
                t_fp8 = graph_us(lambda w: torch._scaled_mm(x8, w.T, scale_a=one, scale_b=one, out_dtype=torch.float16), fp8)
            except RuntimeError:
                t_fp8 = float("nan")  # _scaled_mm rejects this shape (e.g. M not a multiple of 16)
            auto = launch_config(m, n, k, BITS, interpreted=False)
            candidates = [auto] + (sweep_configs(m, n, k, args.sweep) if args.sweep else [])
            results, err = {}, float("nan")
            for config in dict.fromkeys(candidates):
                out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
                try:
                    lut_matmul(x, words0, codebook, scales0_gm, bits=BITS, group=GROUP, n=n, k=k, out=out,
                               config=config)
                except OutOfResources:
                    if config == auto:
                        raise
                    continue  # a swept configuration this card cannot run (shared memory)
                if check:
                    err = check_error(out, x, w_hat, f"{config} on {(m, n, k)}")
                results[config] = graph_us(
                    lambda b: lut_matmul(x, b[0], codebook, b[1], bits=BITS, group=GROUP, n=n, k=k, config=config),
                    luts_gm)
            t_base = float("nan")
            if baseline:
                base_config = baseline.launch_config(m, n, k, BITS, interpreted=False)
                out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
                baseline.lut_matmul(x, words0, codebook, scales0, bits=BITS, group=GROUP, n=n, k=k, out=out,
                                    config=base_config)
                if check:
                    check_error(out, x, w_hat, f"baseline {base_config} on {(m, n, k)}")
                t_base = graph_us(lambda b: baseline.lut_matmul(x, b[0], codebook, b[1], bits=BITS, group=GROUP, n=n,
                                                                k=k, config=base_config), luts)
            best = min(results, key=results.get)
            row = dict(n=n, k=k, m=m, fp16_us=t_fp16, fp8_us=t_fp8, lut_us=results[auto], err=err, baseline_us=t_base,
                       best_us=results[best], best=short(best), auto=short(auto),
                       configs={short(c): us for c, us in results.items()},
                       lut_tb_s=lut_bytes / (results[auto] * 1e-6) / 1e12)
            rows.append(row)
            print(f"{'ok' if check else 'unchecked'} N={n:6d} K={k:6d} M={m:5d}  fp16 {t_fp16:8.1f}us  fp8 {t_fp8:8.1f}us  lut {results[auto]:8.1f}us "
                  f"x{t_fp16 / results[auto]:5.2f}  ({row['lut_tb_s']:.2f} TB/s weights) {short(auto)}"
                  + (f"  baseline {t_base:8.1f}us x{t_fp16 / t_base:5.2f}, speed-up x{t_base / results[auto]:5.2f}"
                     if baseline else "")
                  + (f"  best x{t_fp16 / results[best]:5.2f} {short(best)}" if args.sweep else ""), flush=True)
            if args.out:  # after every row, so a run cut short keeps what it measured
                with open(args.out, "w") as f:
                    json.dump(dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                                   copy_bw=copy_bw, rows=rows), f, indent=1)
        del luts, luts_gm, fp16, fp8
        w_hat = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
