"""Number formats: how scales are stored, FP8 E4M3 rounding, and all-in bits per weight."""
from __future__ import annotations

import math

import torch

# Bits a stored scale costs, by storage format.
SCALE_BITS = {"fp16": 16, "bf16": 16, "e8m0": 8}
E8M0_BIAS = 127
FP8_E4M3_MAX = 448.0


def encode_scales(scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round float scales to their storage format and return the stored tensor.

    fp16/bf16 are stored as themselves; e8m0 (OCP MX) as uint8 biased exponents of a power of
    two, rounded in the log domain. Scales must be positive and finite.
    """
    if fmt == "fp16":
        return scales.clamp(min=2.0**-24, max=65504.0).to(torch.float16)
    if fmt == "bf16":
        return scales.clamp(min=2.0**-133).to(torch.bfloat16)
    if fmt == "e8m0":
        exponent = torch.round(torch.log2(scales.double().clamp(min=2.0**-127)))
        return (exponent + E8M0_BIAS).clamp(0, 254).to(torch.uint8)
    raise ValueError(f"unknown scale format {fmt!r}; use one of {sorted(SCALE_BITS)}")


def decode_scales(stored: torch.Tensor, fmt: str) -> torch.Tensor:
    """Stored scales back to float32."""
    if fmt == "e8m0":
        return torch.exp2(stored.to(torch.float32) - E8M0_BIAS)
    if fmt in ("fp16", "bf16"):
        return stored.to(torch.float32)
    raise ValueError(f"unknown scale format {fmt!r}; use one of {sorted(SCALE_BITS)}")


def round_scales(scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """The float32 value a scale takes once stored in `fmt`."""
    return decode_scales(encode_scales(scales, fmt), fmt)


def round_fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest finite E4M3 value (ties to even), saturating at +-448."""
    return x.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()


def num_groups(k: int, group: int) -> int:
    return math.ceil(k / group)


def groups_major(scales: torch.Tensor) -> torch.Tensor:
    """(N, G) stored scales, the same values, as a view of a (G, N) buffer: a group's scales of
    consecutive rows are then adjacent. The LUT matmul takes scales in any strides; a program of its
    Hopper kernels reads one group for 64 rows, 128 contiguous bytes this way instead of a 32-byte
    sector a row, and on the H200 ran 1.02-1.07x faster at M <= 16 (kernels/BENCHMARKS.md)."""
    return scales.t().contiguous().t()


def sop_bpw(bits: int, group: int, scale_format: str, n: int, k: int) -> float:
    """All-in bits per weight of an SOP layer: codes + scales + the fp16 codebook."""
    scale_bits = SCALE_BITS[scale_format] * n * num_groups(k, group)
    return bits + scale_bits / (n * k) + 16 * 2**bits / (n * k)


def average_bpw(table) -> float:
    """All-in bits per weight of several layers: each layer's bpw weighted by its n * k weights.
    `table` has columns (or keys) bpw, n and k."""
    weights = table["n"] * table["k"]
    return float((weights * table["bpw"]).sum() / weights.sum())
