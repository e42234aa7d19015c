import pandas as pd
import pytest
import torch

from sopq.baselines import BASELINES
from sopq.variants import UNIFORM_BITS, alpha_validation, build_variants, layer_table, materialize, quality_table, summarize
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
    assert torch.equal(materialize(variants["sop_promoted"]["a"]), packed["a"].dequantize())
    assert bpw["sop_promoted"]["a"] < bpw["sop6"]["a"] < bpw["sop_promoted"]["b"]
    assert bpw["sop6"]["a"] == pytest.approx(UNIFORM_BITS + 16 / 32 + 16 * 64 / (16 * 64))
    table = layer_table(weights, Grams(), variants, bpw)
    assert len(table) == 2 * len(variants)
    # 8 bits beat 4 bits on the same layer set; every variant is close to the weights.
    errors = table.set_index(["variant", "layer"])["e_out"]
    assert errors["sop_promoted", "b"] < errors["sop6", "b"] and (table["acos"] > 0.99).all()


def test_variants_from_stored_fits_sweep_and_comparisons(tmp_path):
    from sopq.baselines import EF_BASELINES
    from sopq.promote import budget_sweep
    from sopq.sensitivity import load_fits
    from sopq.sensitivity import FitOption, score_layers

    g = torch.Generator().manual_seed(1)
    weights = {"a": torch.randn(16, 64, generator=g), "b": torch.randn(8, 64, generator=g)}
    grams = Grams()
    options = [FitOption(32, "fp16", "free"), FitOption(32, "fp16", "fp8")]
    table = score_layers(weights, grams, [4, 6, 8], options, True, fits_dir=tmp_path / "fits")
    table["alpha"] = 1.0
    write_packed(load_fits(tmp_path / "fits", dict.fromkeys(weights, "b6.g32.fp16.free")), tmp_path / "packed", "fam")
    _, plans = budget_sweep(table, [7.0, 9.0])
    quantization = {"group": 32, "scale_format": "fp16", "mode": "free", "error_feedback": True}
    variants, bpw = build_variants(
        weights, grams, tmp_path / "packed", quantization, fits_dir=tmp_path / "fits",
        sensitivity=table, sweep_plans=plans, comparisons={"ef_baselines": True, "uniform_without_ef": True},
    )
    assert set(variants) == {"sop_promoted", "sop6", "sop6[g32.fp16.fp8]", "sop_promoted@7", "sop_promoted@9",
                             "sop6_no_ef", *BASELINES, *EF_BASELINES}
    # The stored fits are what a fresh fit gives.
    fresh = quantize_layer(weights["a"], torch.eye(64, dtype=torch.float64), 6, 32, "fp16")
    assert torch.equal(materialize(variants["sop6"]["a"]), fresh.dequantize())
    per_layer = layer_table(weights, grams, variants, bpw)
    e = per_layer.groupby("variant")["e_out"].median()
    assert e["sop_promoted@9"] < e["sop_promoted@7"] and e["sop6"] < e["sop6_no_ef"] or e["sop6"] == pytest.approx(e["sop6_no_ef"])
    end_to_end = pd.DataFrame({"variant": ["reference", *variants], "kl_mean": [0.0, *range(1, len(variants) + 1)]})
    summary = summarize(per_layer, end_to_end)
    quality = quality_table(summary, per_layer, "causal_lm").set_index("variant")
    assert quality.loc["fp8_channel", "ratio_to_fp8_median"] == 1.0 and quality.loc["fp8_channel", "layers_beating_fp8"] == 0
    assert quality.loc["sop6_no_ef", "error_feedback"] == False and quality.loc["int6_channel_ef", "error_feedback"] == True  # noqa: E712
    assert quality["bpw"].is_monotonic_increasing
    pareto = pd.DataFrame({"budget_bpw": [7.0, 9.0, 10.0], "bpw": [6.9, 8.9, 9.9], "predicted": [0.2, 0.1, 0.05]})
    check = alpha_validation(summary, pareto, "causal_lm")
    assert check["budget_bpw"].tolist() == [7.0, 9.0]  # 10.0 was not measured
    assert check["kl_mean"].tolist() == summary.set_index("variant").loc[["sop_promoted@7", "sop_promoted@9"], "kl_mean"].tolist()
