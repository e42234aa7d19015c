"""Per-layer reconstruction metrics."""
from __future__ import annotations

import torch


def _relative(error: torch.Tensor, norm: torch.Tensor) -> float:
    # A layer with zero output (or zero weight) has no relative error to speak of: 0 if the
    # quantized layer reproduces it exactly, NaN (undefined) otherwise.
    return (error / norm).item() if norm > 0 else (0.0 if error == 0 else float("nan"))


class LayerErrors:
    """Errors of any number of reconstructions of one layer (W, H), one float32 matmul each.

    tr(W H W^T) and W H are computed once in float64; per reconstruction only dW H is needed
    (float32: dW is formed in float64 first, so its relative precision is that of float32 on
    E_out itself), and tr(W H W_hat^T) = tr(W H W^T) - tr(W H dW^T) without a second matmul."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor):
        self.W, H = W.double(), H.double()
        self.WH = self.W @ H
        self.w_norm = (self.WH * self.W).sum()
        self.w_square = self.W.square().sum()
        self.H32 = H.float()

    def __call__(self, W_hat: torch.Tensor) -> dict[str, float]:
        """e_out: tr(dW H dW^T) / tr(W H W^T), the relative error of the layer's outputs on the
        calibration inputs; mse: ||dW||^2 / ||W||^2; acos: cosine of W and W_hat under the H
        inner product (activation-weighted cosine similarity)."""
        w_norm = self.w_norm
        dW = self.W - W_hat.double()
        # An exact reconstruction (a GGUF source's grid) needs no matmul.
        e = ((dW.float() @ self.H32).double() * dW).sum() if dW.any() else dW.new_zeros(())
        cross = (self.WH * dW).sum()  # tr(W H dW^T)
        what_norm = w_norm - 2 * cross + e
        return {
            "e_out": _relative(e, w_norm),
            "mse": _relative(dW.square().sum(), self.w_square),
            "acos": ((w_norm - cross) / (w_norm * what_norm).sqrt()).item() if w_norm > 0 and what_norm > 0 else float("nan"),
        }


def layer_errors(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> dict[str, float]:
    """LayerErrors(W, H)(W_hat) for one reconstruction."""
    return LayerErrors(W, H)(W_hat)


def layer_errors_many(W: torch.Tensor, W_hats: dict, H: torch.Tensor) -> dict[str, dict[str, float]]:
    """{name: errors} of several reconstructions of one layer (see LayerErrors)."""
    errors = LayerErrors(W, H)
    return {name: errors(W_hat) for name, W_hat in W_hats.items()}
