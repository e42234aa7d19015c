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


def test_minifloat_matches_torch_float8_e4m3_and_e5m2():
    from sopq.baselines import Minifloat

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g) * s for s in (1e-3, 0.1, 1.0, 30.0, 300.0)])
    x = torch.cat([x, torch.tensor([0.0, 2.0**-9, 2.0**-10, 1.0625, 1.1875, 448.0, 464.0, -1e5])])
    # E4M3FN gives its top binade's last code to NaN, so its largest value is 448, not the 480
    # of the generic format: compare inside +-448, where the two formats agree.
    inside = x.clamp(-448, 448)
    assert torch.equal(Minifloat(exp_bits=4, man_bits=3, bias=7).round(inside), inside.to(torch.float8_e4m3fn).double())
    e5m2 = Minifloat(exp_bits=5, man_bits=2, bias=15)
    inside = x.clamp(-57344, 57344)
    assert torch.equal(e5m2.round(inside), inside.to(torch.float8_e5m2).double())


def test_fp6_known_values():
    from sopq.baselines import FP6_E2M3, FP6_E3M2

    assert FP6_E2M3.max_value == 7.5 and FP6_E3M2.max_value == 28.0
    # E2M3: subnormal step 1/8 below 1; 0.0625 is a tie between 0 and 0.125 -> even (0).
    x = torch.tensor([0.0625, 0.1875, 1.0, 1.0625, 3.3, 7.4, 8.0, -100.0])
    assert FP6_E2M3.round(x).tolist() == [0.0, 0.25, 1.0, 1.0, 3.25, 7.5, 7.5, -7.5]
    # E3M2: smallest subnormal 2^-4; binade [4, 8) has step 1.
    y = torch.tensor([0.03125, 0.09375, 5.4, 5.5, 6.5, 27.0, 30.0])
    assert FP6_E3M2.round(y).tolist() == [0.0, 0.125, 5.0, 6.0, 6.0, 28.0, 28.0]


def test_mx_scales_and_bpw():
    from sopq.baselines import FP6_E2M3, minifloat_mx

    # One block: absmax 6 -> scale 2^(floor(log2 6) - 2) = 1, so E2M3 values survive exactly.
    W = torch.tensor([[6.0, 1.5, -0.25] + [0.0] * 29])
    W_hat, bpw = minifloat_mx(W, FP6_E2M3)
    assert torch.equal(W_hat.float(), W) and bpw == 6.25
    # K = 40: two blocks (the second partial) per row.
    assert minifloat_mx(torch.randn(3, 40), FP6_E2M3)[1] == pytest.approx(6 + 8 * 2 / 40)


def test_int_per_channel():
    from sopq.baselines import int_per_channel

    W = torch.tensor([[31.0, -15.5, 0.4], [1.0, 0.5, 0.26]])
    W_hat, bpw = int_per_channel(W, 6)  # qmax 31: row 0 has scale 1, row 1 scale 1/31
    assert W_hat[0].tolist() == [31.0, -16.0, 0.0]  # -15.5 ties to even
    assert (W_hat[1] * 31).round().tolist() == [31.0, 16.0, 8.0]
    assert bpw == 6 + 32 / 3


def test_layer_errors_many_matches_float64_definitions():
    from sopq.metrics import layer_errors_many

    g = torch.Generator().manual_seed(5)
    W = torch.randn(12, 20, generator=g, dtype=torch.float64)
    X = torch.randn(200, 20, generator=g, dtype=torch.float64)
    H = X.T @ X / 200
    hats = {"a": W + 0.01 * torch.randn(12, 20, generator=g, dtype=torch.float64), "b": fp8_per_channel(W)[0],
            "tiny": W + 1e-6 * torch.randn(12, 20, generator=g, dtype=torch.float64)}
    many = layer_errors_many(W, hats, H)
    for name, W_hat in hats.items():
        dW = W - W_hat
        norm = torch.trace(W @ H @ W.T)
        assert many[name]["e_out"] == pytest.approx((torch.trace(dW @ H @ dW.T) / norm).item(), rel=1e-5)
        assert many[name]["mse"] == pytest.approx((dW.square().sum() / W.square().sum()).item(), rel=1e-12)
        acos = torch.trace(W @ H @ W_hat.T) / (norm * torch.trace(W_hat @ H @ W_hat.T)).sqrt()
        assert many[name]["acos"] == pytest.approx(acos.item(), rel=1e-9)


def test_layer_errors_of_a_zero_layer():
    W = torch.zeros(2, 3)
    assert layer_errors(W, W, torch.eye(3)) == {"e_out": 0.0, "mse": 0.0, "acos": pytest.approx(float("nan"), nan_ok=True)}
    wrong = layer_errors(W, torch.ones(2, 3), torch.eye(3))
    assert torch.isnan(torch.tensor([wrong["e_out"], wrong["mse"]])).all()


@pytest.mark.parametrize("name", ["fp8_channel_ef", "fp6_e2m3_mx_ef", "int6_channel_ef"])
def test_fixed_formats_with_error_feedback_stay_on_their_grid_and_lower_output_error(name):
    from sopq.baselines import EF_BASELINES
    from sopq.quantize import inverse_cholesky

    g = torch.Generator().manual_seed(6)
    W = torch.randn(32, 96, generator=g)
    X = torch.randn(1024, 96, generator=g) @ (torch.eye(96) + 0.3 * torch.randn(96, 96, generator=g))
    H = (X.T @ X / 1024).double()
    grid = EF_BASELINES[name](W)
    rtn = grid.round_to_nearest(W)
    ef = grid.error_feedback(W, inverse_cholesky(H))
    # Same scales, same element grid: rounding the EF result again changes nothing.
    assert torch.allclose(grid.round_to_nearest(ef), ef.double(), rtol=1e-6, atol=1e-12)
    assert layer_errors(W, ef, H)["e_out"] < 0.8 * layer_errors(W, rtn, H)["e_out"]
