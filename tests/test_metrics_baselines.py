import pytest
import torch

from sopq.baselines import fp8_per_channel, fp8_per_tensor
from sopq.metrics import layer_errors


def test_layer_errors_known_values():
    W = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    dW = torch.tensor([[0.1, 0.0], [0.0, -0.2]], dtype=torch.float64)
    H = torch.diag(torch.tensor([4.0, 1.0]))
    e = layer_errors(W, W - dW, H)
    # tr(dW H dW^T) = 4*0.01 + 1*0.04 = 0.08; tr(W H W^T) = 4*(1+9) + (4+16) = 60
    assert e["e_out"] == pytest.approx(0.08 / 60)
    assert e["mse"] == pytest.approx(0.05 / 30)
    assert layer_errors(W, W, H) == {"e_out": 0.0, "mse": 0.0, "acos": pytest.approx(1.0)}
    assert layer_errors(W, -W, H)["acos"] == pytest.approx(-1.0)


def test_output_error_uses_the_full_gram_matrix():
    W = torch.tensor([[1.0, 1.0]])
    dW = torch.tensor([[0.1, -0.1]])
    correlated = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # both inputs always equal
    # The two errors cancel on every input: no output error, though the weights differ.
    assert layer_errors(W, W - dW, correlated)["e_out"] == pytest.approx(0.0)


def test_fp8_per_channel_is_exact_on_representable_rows():
    # Row absmax 448 -> scale 1: every entry is an E4M3 value and survives unchanged.
    W = torch.tensor([[448.0, 1.0, -0.5, 0.001953125], [224.0, 3.0, -14.0, 0.25]])
    W_hat, bpw = fp8_per_channel(W)
    assert torch.equal(W_hat.float(), W)
    assert bpw == 8 + 32 / 4


def test_fp8_per_tensor_uses_a_power_of_two_scale():
    W = torch.tensor([[3.0, 0.1], [-1.5, 0.7]])
    W_hat, bpw = fp8_per_tensor(W)
    # absmax 3 / 448 -> scale 2^-7; 3 * 2^7 = 384 is an E4M3 value, so 3 survives exactly.
    assert W_hat[0, 0] == 3.0 and W_hat[1, 0] == -1.5
    scaled = W_hat * 2**7
    assert torch.equal(scaled, scaled.float().to(torch.float8_e4m3fn).double())
    assert bpw == 8 + 8 / 4
