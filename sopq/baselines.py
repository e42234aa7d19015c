"""Fixed-format baselines, round to nearest, with the same bpw accounting as SOP.

Scale storage counted in bpw: per-channel variants keep one fp32 scale per output channel (as
FP8 rowwise deployments do); the FP8 per-tensor scale is a power of two (one E8M0 byte); MX
formats share one E8M0 scale per block of 32 inputs (OCP MX).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sopq.formats import FP8_E4M3_MAX, round_fp8_e4m3

CHANNEL_SCALE_BITS = 32
E8M0_BITS = 8
MX_BLOCK = 32


@dataclass(frozen=True)
class Minifloat:
    """A sign + exp_bits + man_bits float with IEEE-style subnormals and no Inf/NaN codes."""

    exp_bits: int
    man_bits: int
    bias: int

    @property
    def max_value(self) -> float:
        return (2 - 2.0**-self.man_bits) * 2.0 ** (2**self.exp_bits - 1 - self.bias)

    @property
    def emax(self) -> int:
        """Exponent of the largest normal value."""
        return 2**self.exp_bits - 1 - self.bias

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest representable value (ties to even), saturating at +-max_value."""
        x = x.double()
        magnitude = x.abs().clamp(max=self.max_value)
        # Quantum of the binade each value falls in; below the smallest normal, the subnormal step.
        exponent = torch.floor(torch.log2(magnitude.clamp(min=2.0**-300))).clamp(min=1 - self.bias)
        quantum = torch.exp2(exponent - self.man_bits)
        return torch.sign(x) * (torch.round(magnitude / quantum) * quantum).clamp(max=self.max_value)


FP6_E2M3 = Minifloat(exp_bits=2, man_bits=3, bias=1)  # max 7.5
FP6_E3M2 = Minifloat(exp_bits=3, man_bits=2, bias=3)  # max 28


def fp8_per_tensor(W: torch.Tensor) -> tuple[torch.Tensor, float]:
    """FP8 E4M3 with one power-of-two scale per tensor, chosen so the largest weight fits."""
    n, k = W.shape
    absmax = W.abs().max().double().clamp(min=1e-30)
    scale = torch.exp2(torch.ceil(torch.log2(absmax / FP8_E4M3_MAX)))
    W_hat = round_fp8_e4m3(W.double() / scale).double() * scale
    return W_hat, 8 + E8M0_BITS / (n * k)


def fp8_per_channel(W: torch.Tensor) -> tuple[torch.Tensor, float]:
    """FP8 E4M3 with one fp32 scale per output channel (absmax / 448)."""
    n, k = W.shape
    scale = (W.abs().amax(1, keepdim=True).float() / FP8_E4M3_MAX).clamp(min=1e-30)
    W_hat = round_fp8_e4m3(W.float() / scale).double() * scale.double()
    return W_hat, 8 + CHANNEL_SCALE_BITS / k


def minifloat_per_channel(W: torch.Tensor, fmt: Minifloat) -> tuple[torch.Tensor, float]:
    """One fp32 scale per output channel mapping the row's absmax to the format's largest value."""
    n, k = W.shape
    scale = (W.abs().amax(1, keepdim=True).float() / fmt.max_value).clamp(min=1e-30).double()
    return fmt.round(W.double() / scale) * scale, 1 + fmt.exp_bits + fmt.man_bits + CHANNEL_SCALE_BITS / k


def minifloat_mx(W: torch.Tensor, fmt: Minifloat) -> tuple[torch.Tensor, float]:
    """OCP MX: blocks of 32 inputs share the E8M0 scale 2^(floor(log2 absmax) - emax); elements
    round to nearest and saturate. A partial last block pays for a whole scale."""
    n, k = W.shape
    blocks = math.ceil(k / MX_BLOCK)
    padded = torch.nn.functional.pad(W.double(), (0, blocks * MX_BLOCK - k)).reshape(n, blocks, MX_BLOCK)
    absmax = padded.abs().amax(-1, keepdim=True).clamp(min=2.0**-127)
    scale = torch.exp2(torch.floor(torch.log2(absmax)) - fmt.emax)
    W_hat = (fmt.round(padded / scale) * scale).reshape(n, -1)[:, :k]
    return W_hat, 1 + fmt.exp_bits + fmt.man_bits + E8M0_BITS * n * blocks / (n * k)


def int_per_channel(W: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    """Symmetric integer, one fp32 scale per output channel: absmax maps to 2^(bits-1) - 1."""
    n, k = W.shape
    qmax = 2 ** (bits - 1) - 1
    scale = (W.abs().amax(1, keepdim=True).double() / qmax).clamp(min=1e-30)
    return torch.round(W.double() / scale).clamp(-qmax, qmax) * scale, bits + CHANNEL_SCALE_BITS / k


BASELINES = {
    "fp8_channel": fp8_per_channel,
    "fp8_tensor": fp8_per_tensor,
    "fp6_e2m3_mx": lambda W: minifloat_mx(W, FP6_E2M3),
    "fp6_e3m2_mx": lambda W: minifloat_mx(W, FP6_E3M2),
    "fp6_e2m3_channel": lambda W: minifloat_per_channel(W, FP6_E2M3),
    "fp6_e3m2_channel": lambda W: minifloat_per_channel(W, FP6_E3M2),
    "int8_channel": lambda W: int_per_channel(W, 8),
    "int6_channel": lambda W: int_per_channel(W, 6),
}
