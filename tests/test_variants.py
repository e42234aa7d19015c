import pandas as pd
import pytest
import torch

from sopq.baselines import BASELINES
from sopq.variants import UNIFORM_BITS, build_variants, layer_table, summarize
from sopq.quantize import quantize_layer
from sopq.store import write_packed


class Grams(dict):
    def __getitem__(self, layer):
        return torch.eye(64, dtype=torch.float64)


def test_summarize_weights_bpw_by_layer_size():
    per_layer = pd.DataFrame({
        "variant": ["v", "v", "w", "w"], "layer": ["a", "b", "a", "b"],
        "n": [10, 30, 10, 30], "k": [1, 1, 1, 1], "bpw": [4.0, 8.0, 6.0, 6.0],
        "e_out": [0.1, 0.3, 0.2, 0.2], "mse": 0.0, "acos": 1.0,
    })
    end_to_end = pd.DataFrame({"variant": ["reference", "v", "w"], "kl_mean": [0.0, 0.5, 0.25]})
    summary = summarize(per_layer, end_to_end).set_index("variant")
    assert summary.index.tolist() == ["reference", "v", "w"]
    assert summary.loc["v", "bpw"] == pytest.approx((10 * 4 + 30 * 8) / 40)
    assert summary.loc["v", "e_out_median"] == pytest.approx(0.2) and summary.loc["v", "e_out_max"] == 0.3
    assert summary.loc["w", "kl_mean"] == 0.25 and pd.isna(summary.loc["reference", "bpw"])


def test_build_variants_reads_the_packed_plan_and_fits_uniform(tmp_path):
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(16, 64, generator=g), "b": torch.randn(8, 64, generator=g)}
    packed = {name: quantize_layer(W, torch.eye(64, dtype=torch.float64), bits, 32, "fp16")
              for (name, W), bits in zip(weights.items(), (4, 8))}
    write_packed(packed, tmp_path / "packed", "fam")
    quantization = {"group": 32, "scale_format": "fp16", "error_feedback": True}
    variants, bpw = build_variants(weights, Grams(), tmp_path / "packed", quantization)
    assert set(variants) == {"sop_promoted", "sop6", *BASELINES}
    assert torch.equal(variants["sop_promoted"]["a"], packed["a"].dequantize())
    assert bpw["sop_promoted"]["a"] < bpw["sop6"]["a"] < bpw["sop_promoted"]["b"]
    assert bpw["sop6"]["a"] == pytest.approx(UNIFORM_BITS + 16 / 32 + 16 * 64 / (16 * 64))
    table = layer_table(weights, Grams(), variants, bpw)
    assert len(table) == 2 * len(variants)
    # 8 bits beat 4 bits on the same layer set; every variant is close to the weights.
    errors = table.set_index(["variant", "layer"])["e_out"]
    assert errors["sop_promoted", "b"] < errors["sop6", "b"] and (table["acos"] > 0.99).all()
