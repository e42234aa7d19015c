"""Validate the Triton LUT matmul on every packed layer (and time it where a GPU is present)."""
from __future__ import annotations

import pandas as pd
import torch
from tqdm import tqdm

from kernels import lut_matmul, reference_lut_matmul
from sopq.store import read_packed_tensors


def _time_us(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn) * 1e3


def check_packed_layers(packed_dir, m: int, seed: int) -> pd.DataFrame:
    """Per layer: max abs and relative error of the kernel against the float64 reference on a
    random fp16 activation of m rows; on GPU, kernel and fp16 torch.matmul times in us."""
    manifest, tensors = read_packed_tensors(packed_dir)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    device_name = torch.cuda.get_device_name() if cuda else "cpu-interpreter"
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for name, meta in tqdm(manifest["layers"].items(), desc="kernel", unit="layer"):
        n, k = meta["shape"]
        args = {part: t.to(device) for part, t in tensors[name].items()}
        shape = dict(bits=meta["bits"], group=meta["group"], n=n, k=k)
        x = torch.randn(m, k, generator=generator).to(device, torch.float16)
        run = lambda: lut_matmul(x, args["codes"], args["codebook"], args["scales"], **shape)  # noqa: E731
        y = run().double().cpu()
        y_ref = reference_lut_matmul(x, args["codes"], args["codebook"], args["scales"], **shape)
        row = {
            "layer": name, "bits": meta["bits"], "n": n, "k": k, "m": m,
            "max_abs_err": (y - y_ref).abs().max().item(),
            "rel_err": ((y - y_ref).norm() / y_ref.norm()).item(),
            "device": device_name, "kernel_us": float("nan"), "torch_us": float("nan"),
        }
        if cuda:
            w_fp16 = torch.randn(n, k, device=device, dtype=torch.float16)
            row["kernel_us"] = _time_us(run)
            row["torch_us"] = _time_us(lambda: x @ w_fp16.T)
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table["rel_err"].notna().all():
        raise ValueError(f"{packed_dir}: the kernel produced NaN for layers {list(table.loc[table.rel_err.isna(), 'layer'])}")
    return table
