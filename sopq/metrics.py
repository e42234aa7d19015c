"""Per-layer reconstruction metrics, all in float64."""
from __future__ import annotations

import torch


def _h_inner(A: torch.Tensor, B: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """tr(A H B^T): the inner product of two weight matrices under the input Gram matrix."""
    return ((A @ H) * B).sum()


def layer_errors(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> dict[str, float]:
    """e_out: tr(dW H dW^T) / tr(W H W^T), the relative error of the layer's outputs on the
    calibration inputs; mse: ||dW||^2 / ||W||^2; acos: cosine of W and W_hat under the H inner
    product (activation-weighted cosine similarity)."""
    W, W_hat, H = W.double(), W_hat.double(), H.double()
    dW = W - W_hat
    w_norm = _h_inner(W, W, H)
    what_norm = _h_inner(W_hat, W_hat, H)
    dw_norm = _h_inner(dW, dW, H)
    # A layer with zero output (or zero weight) has no relative error to speak of: 0 if the
    # quantized layer reproduces it exactly, NaN (undefined) otherwise.
    return {
        "e_out": (dw_norm / w_norm).item() if w_norm > 0 else (0.0 if dw_norm == 0 else float("nan")),
        "mse": (dW.square().sum() / W.square().sum()).item() if W.any() else (0.0 if not dW.any() else float("nan")),
        "acos": (_h_inner(W, W_hat, H) / (w_norm * what_norm).sqrt()).item()
        if w_norm > 0 and what_norm > 0
        else float("nan"),
    }


class LayerErrors:
    """layer_errors of any number of reconstructions of one layer (W, H), one float32 matmul each.

    tr(W H W^T) and W H are computed once in float64; per reconstruction only dW H is needed
    (float32: dW is formed in float64 first, so its relative precision is that of float32 on
    E_out itself), and tr(W H W_hat^T) = tr(W H W^T) - tr(W H dW^T) without a second matmul."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor):
        self.W, H = W.double(), H.double()
        self.WH = self.W @ H
        self.w_norm = (self.WH * self.W).sum()
        self.w_sq = self.W.square().sum()
        self.H32 = H.float()

    def __call__(self, W_hat: torch.Tensor) -> dict[str, float]:
        w_norm = self.w_norm
        dW = self.W - W_hat.double()
        e = ((dW.float() @ self.H32).double() * dW).sum()
        cross = w_norm - (self.WH * dW).sum()  # tr(W H W_hat^T)
        what_norm = w_norm - 2 * (self.WH * dW).sum() + e
        return {
            "e_out": (e / w_norm).item() if w_norm > 0 else float("nan"),
            "mse": (dW.square().sum() / self.w_sq).item() if self.w_sq > 0 else float("nan"),
            "acos": (cross / (w_norm * what_norm).sqrt()).item() if w_norm > 0 and what_norm > 0 else float("nan"),
        }


def layer_errors_many(W: torch.Tensor, W_hats: dict, H: torch.Tensor) -> dict[str, dict[str, float]]:
    """layer_errors of several reconstructions of one layer (see LayerErrors)."""
    errors = LayerErrors(W, H)
    return {name: errors(W_hat) for name, W_hat in W_hats.items()}
