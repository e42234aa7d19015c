"""Fixed-format baselines, round to nearest, with the same bpw accounting as SOP.

Scale storage counted in bpw: per-channel variants keep one fp32 scale per output channel (as
FP8 rowwise deployments do); the FP8 per-tensor scale is a power of two (one E8M0 byte); MX
formats share one E8M0 scale per block of 32 inputs (OCP MX).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sopq.formats import FP8_E4M3_MAX, round_fp8_e4m3
from sopq.packing import per_weight
from sopq.quantize import gptq_round

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


@dataclass(frozen=True)
class ScaledGrid:
    """A fixed-format layer: every weight is scale * round(weight / scale), with `scale` one value
    per weight (N, K) fixed from the weights, and `round` the format's round to nearest."""

    scale: torch.Tensor
    round: Callable[[torch.Tensor], torch.Tensor]
    bpw: float

    def round_to_nearest(self, W: torch.Tensor) -> torch.Tensor:
        return self.round(W.double() / self.scale) * self.scale

    def error_feedback(self, W: torch.Tensor, hinv_chol: torch.Tensor) -> torch.Tensor:
        """The same grid and scales with GPTQ-style error feedback (sopq.quantize.gptq_round)."""
        scale = self.scale.float()
        return gptq_round(W, hinv_chol, lambda i, col: self.round(col / scale[:, i]).float() * scale[:, i])


def fp8_channel_grid(W: torch.Tensor) -> ScaledGrid:
    """FP8 E4M3 with one fp32 scale per output channel (absmax / 448)."""
    n, k = W.shape
    scale = (W.abs().amax(1, keepdim=True).float() / FP8_E4M3_MAX).clamp(min=1e-30).double()
    return ScaledGrid(scale.expand(n, k), round_fp8_e4m3, 8 + CHANNEL_SCALE_BITS / k)


def minifloat_channel_grid(W: torch.Tensor, fmt: Minifloat) -> ScaledGrid:
    """One fp32 scale per output channel mapping the row's absmax to the format's largest value."""
    n, k = W.shape
    scale = (W.abs().amax(1, keepdim=True).float() / fmt.max_value).clamp(min=1e-30).double()
    return ScaledGrid(scale.expand(n, k), fmt.round, 1 + fmt.exp_bits + fmt.man_bits + CHANNEL_SCALE_BITS / k)


def minifloat_mx_grid(W: torch.Tensor, fmt: Minifloat) -> ScaledGrid:
    """OCP MX: blocks of 32 inputs share the E8M0 scale 2^(floor(log2 absmax) - emax); elements
    round to nearest and saturate. A partial last block pays for a whole scale."""
    n, k = W.shape
    blocks = math.ceil(k / MX_BLOCK)
    padded = torch.nn.functional.pad(W.double(), (0, blocks * MX_BLOCK - k)).reshape(n, blocks, MX_BLOCK)
    absmax = padded.abs().amax(-1).clamp(min=2.0**-127)
    scale = per_weight(torch.exp2(torch.floor(torch.log2(absmax)) - fmt.emax), MX_BLOCK, k)
    return ScaledGrid(scale, fmt.round, 1 + fmt.exp_bits + fmt.man_bits + E8M0_BITS * n * blocks / (n * k))


def int_channel_grid(W: torch.Tensor, bits: int) -> ScaledGrid:
    """Symmetric integer, one fp32 scale per output channel: absmax maps to 2^(bits-1) - 1."""
    n, k = W.shape
    qmax = 2 ** (bits - 1) - 1
    scale = (W.abs().amax(1, keepdim=True).double() / qmax).clamp(min=1e-30)
    return ScaledGrid(scale.expand(n, k), lambda u: torch.round(u.double()).clamp(-qmax, qmax), bits + CHANNEL_SCALE_BITS / k)


def fp8_per_channel(W: torch.Tensor) -> tuple[torch.Tensor, float]:
    grid = fp8_channel_grid(W)
    return grid.round_to_nearest(W), grid.bpw


def minifloat_per_channel(W: torch.Tensor, fmt: Minifloat) -> tuple[torch.Tensor, float]:
    grid = minifloat_channel_grid(W, fmt)
    return grid.round_to_nearest(W), grid.bpw


def minifloat_mx(W: torch.Tensor, fmt: Minifloat) -> tuple[torch.Tensor, float]:
    grid = minifloat_mx_grid(W, fmt)
    return grid.round_to_nearest(W), grid.bpw


def int_per_channel(W: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    grid = int_channel_grid(W, bits)
    return grid.round_to_nearest(W), grid.bpw


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

# Fixed formats also run through the same error feedback as SOP (variant name -> grid), so the
# report separates what the per-layer codebook buys from what error feedback buys.
EF_BASELINES = {
    "fp8_channel_ef": fp8_channel_grid,
    "fp6_e2m3_mx_ef": lambda W: minifloat_mx_grid(W, FP6_E2M3),
    "int6_channel_ef": lambda W: int_channel_grid(W, 6),
}
