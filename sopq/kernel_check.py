"""Validate the Triton LUT matmul on every packed layer (and time it where a GPU is present)."""
from __future__ import annotations

import pandas as pd
import torch
from tqdm import tqdm

from kernels import lut_matmul, reference_lut_matmul
from kernels.lut_matmul import launch_config
from sopq.formats import groups_major
from sopq.store import PackedReader

# Relative error allowed against the float64 reference with fp16 activations: fp16 rounding of
# the output and of the dot's operands, accumulated in fp32.
MAX_REL_ERR = 1e-2


def _time_us(fn) -> float:
    """Median GPU time of fn in a CUDA graph (no Python launch overhead), in us."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, return_mode="median") * 1e3


def relative_error(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    """||y - y_ref|| / ||y_ref||; for an all-zero reference (a zero layer), 0 if y is zero too."""
    diff = (y - y_ref).norm().item()
    ref = y_ref.norm().item()
    return diff / ref if ref > 0 else (0.0 if diff == 0 else float("inf"))


def check_packed_layers(packed_dir, m: int, seed: int) -> pd.DataFrame:
    """Per layer: max abs and relative error of the kernel against the float64 reference on a
    random fp16 activation of m rows; on GPU, kernel and fp16 torch.matmul times in us (medians
    in a CUDA graph, weights read from L2 for layers that fit in it: see kernels/BENCHMARKS.md
    for timings without that help).
    Raises ValueError naming the layers whose error is not finite or above MAX_REL_ERR."""
    packed = PackedReader(packed_dir)  # one layer's codes in memory at a time
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    device_name = torch.cuda.get_device_name() if cuda else "cpu-interpreter"
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for name, meta in tqdm(packed.manifest["layers"].items(), desc="kernel", unit="layer"):
        n, k = meta["shape"]
        t = packed.tensors(name)
        # Scales as PackedLinear holds them (groups-major), so the times are the model's.
        words, scales = t["codes"].to(device), groups_major(t["scales"].to(device))
        codebook = t["codebook"].to(device)  # the kernel reads the lookup table as stored (fp16)
        shape = dict(bits=meta["bits"], group=meta["group"], n=n, k=k)
        x = torch.randn(m, k, generator=generator).to(device, torch.float16)
        config = launch_config(m, n, k, meta["bits"], interpreted=not cuda)
        run = lambda: lut_matmul(x, words, codebook, scales, **shape, config=config)  # noqa: E731
        y = run().double().cpu()
        y_ref = reference_lut_matmul(x, words, codebook, scales, **shape)
        row = {
            "layer": name, "bits": meta["bits"], "n": n, "k": k, "m": m,
            "max_abs_err": (y - y_ref).abs().max().item(), "rel_err": relative_error(y, y_ref),
            "kernel": config.kernel, "block_n": config.block_n,
            "device": device_name, "kernel_us": float("nan"), "torch_us": float("nan"),
        }
        if cuda:
            w_fp16 = torch.randn(n, k, device=device, dtype=torch.float16)
            row["kernel_us"] = _time_us(run)
            row["torch_us"] = _time_us(lambda: x @ w_fp16.T)
        rows.append(row)
    table = pd.DataFrame(rows)
    bad = table.loc[~(table["rel_err"] <= MAX_REL_ERR), "layer"].tolist()  # NaN fails too
    if bad:
        raise ValueError(f"{packed_dir}: the kernel disagrees with the reference (rel_err > {MAX_REL_ERR} or NaN) on {bad}")
    return table
