"""Fixed-format baselines, round to nearest, with the same bpw accounting as SOP."""
from __future__ import annotations

import torch

from sopq.formats import FP8_E4M3_MAX, round_fp8_e4m3

# Scale storage counted in bpw: FP8 rowwise deployments keep one fp32 scale per output channel;
# the per-tensor scale is a power of two (one E8M0 byte).
FP8_CHANNEL_SCALE_BITS = 32
FP8_TENSOR_SCALE_BITS = 8


def fp8_per_tensor(W: torch.Tensor) -> tuple[torch.Tensor, float]:
    """FP8 E4M3 with one power-of-two scale per tensor, chosen so the largest weight fits."""
    n, k = W.shape
    absmax = W.abs().max().double().clamp(min=1e-30)
    scale = torch.exp2(torch.ceil(torch.log2(absmax / FP8_E4M3_MAX)))
    W_hat = round_fp8_e4m3(W.double() / scale).double() * scale
    return W_hat, 8 + FP8_TENSOR_SCALE_BITS / (n * k)


def fp8_per_channel(W: torch.Tensor) -> tuple[torch.Tensor, float]:
    """FP8 E4M3 with one fp32 scale per output channel (absmax / 448)."""
    n, k = W.shape
    scale = (W.abs().amax(1, keepdim=True).float() / FP8_E4M3_MAX).clamp(min=1e-30)
    W_hat = round_fp8_e4m3(W.float() / scale).double() * scale.double()
    return W_hat, 8 + FP8_CHANNEL_SCALE_BITS / k


BASELINES = {"fp8_channel": fp8_per_channel, "fp8_tensor": fp8_per_tensor}
