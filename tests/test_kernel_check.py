import pytest
import torch

from sopq.kernel_check import check_packed_layers, relative_error
from sopq.quantize import quantize_layer
from sopq.store import write_packed


def test_every_packed_layer_is_checked_against_the_reference(tmp_path):
    g = torch.Generator().manual_seed(0)
    H = torch.eye(48, dtype=torch.float64)
    layers = {
        "a": quantize_layer(torch.randn(40, 48, generator=g), H, 6, 32, "fp16"),
        "b": quantize_layer(torch.randn(24, 48, generator=g), H, 4, 16, "e8m0"),
        "zero": quantize_layer(torch.zeros(8, 48), H, 5, 32, "bf16"),
    }
    write_packed(layers, tmp_path / "packed", "fam")
    table = check_packed_layers(tmp_path / "packed", m=3, seed=0)
    assert table["layer"].tolist() == ["a", "b", "zero"]
    assert table.loc[table.layer == "zero", "rel_err"].item() == 0.0
    assert (table["rel_err"] < 1e-2).all() and (table["device"] == "cpu-interpreter").all()


def test_a_wrong_kernel_result_fails_the_stage(tmp_path, monkeypatch):
    H = torch.eye(32, dtype=torch.float64)
    write_packed({"a": quantize_layer(torch.randn(16, 32), H, 6, 32, "fp16")}, tmp_path / "packed", "fam")
    import sopq.kernel_check as kc

    monkeypatch.setattr(kc, "lut_matmul", lambda x, *a, **kw: torch.zeros(x.shape[0], kw["n"], dtype=x.dtype))
    with pytest.raises(ValueError, match=r"disagrees with the reference .* on \['a'\]"):
        check_packed_layers(tmp_path / "packed", m=2, seed=0)


def test_relative_error():
    assert relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])) == 0
    assert relative_error(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0])) == float("inf")
    assert relative_error(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])) == 0.5
