import functools

import pandas as pd
import pytest
import torch

import sopq.evaluate
from sopq.baselines import BASELINES
from sopq.calibrate import collect_stats
from sopq.evaluate import evaluate_variants
from sopq.model import get_weight, load_empty_model, load_model, quantizable_layers, token_sequences
from sopq.metrics import layer_errors_many
from sopq.variants import UNIFORM_BITS, LayerInput, alpha_validation, build_variants, evaluate_streaming, quality_table, summarize
from sopq.quantize import quantize_layer
from sopq.store import write_packed
from tiny_models import make_tiny_bert, make_tiny_gguf_dir, make_tiny_llama, sample_text


class Grams(dict):
    def __getitem__(self, layer):
        return torch.eye(64, dtype=torch.float64)


def made(variants, weights, gram):
    """{variant: {layer: (W_hat, bpw)}}: every variant's layers made from the original weights."""
    return {v: {name: make(LayerInput(weights[name], gram[name])) for name, make in makers.items()}
            for v, makers in variants.items()}


def layer_table(weights, gram, hats):
    """The per-layer rows evaluate_streaming writes, computed layer by layer in memory."""
    rows = []
    for layer, W in weights.items():
        errors = layer_errors_many(W, {v: hats[v][layer][0] for v in hats}, gram[layer])
        rows += [{"variant": v, "layer": layer, "n": W.shape[0], "k": W.shape[1], "bpw": hats[v][layer][1], **errors[v]}
                 for v in hats]
    return pd.DataFrame(rows)


def shapes(weights):
    return {name: tuple(W.shape) for name, W in weights.items()}


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
    hats = made(build_variants(shapes(weights), tmp_path / "packed", quantization), weights, Grams())
    assert set(hats) == {"sop_promoted", "sop6", *BASELINES}
    assert torch.equal(hats["sop_promoted"]["a"][0], packed["a"].dequantize())
    bpw = {v: {layer: hat_bpw[1] for layer, hat_bpw in layers.items()} for v, layers in hats.items()}
    assert bpw["sop_promoted"]["a"] < bpw["sop6"]["a"] < bpw["sop_promoted"]["b"]
    assert bpw["sop6"]["a"] == pytest.approx(UNIFORM_BITS + 16 / 32 + 16 * 64 / (16 * 64))
    table = layer_table(weights, Grams(), hats)
    assert len(table) == 2 * len(hats)
    # 8 bits beat 4 bits on the same layer set; every variant is close to the weights.
    errors = table.set_index(["variant", "layer"])["e_out"]
    assert errors["sop_promoted", "b"] < errors["sop6", "b"] and (table["acos"] > 0.99).all()


def test_variants_from_stored_fits_sweep_and_comparisons(tmp_path):
    from sopq.baselines import EF_BASELINES
    from sopq.promote import budget_sweep
    from sopq.sensitivity import load_fits
    from sopq.sensitivity import FitOption, score_layers

    g = torch.Generator().manual_seed(1)
    # Two widths K, so that the option "row" is a different group in each layer.
    weights = {"a": torch.randn(16, 64, generator=g), "b": torch.randn(8, 96, generator=g)}
    grams = {name: torch.eye(W.shape[1], dtype=torch.float64) for name, W in weights.items()}
    options = [FitOption(32, "fp16", "free"), FitOption(32, "fp16", "fp8"), FitOption("row", "fp16", "free")]
    table = score_layers(weights, grams, [4, 6, 8], options, True, fits_dir=tmp_path / "fits")
    table["alpha"] = 1.0
    write_packed(load_fits(tmp_path / "fits", dict.fromkeys(weights, "b6.g32.fp16.free")), tmp_path / "packed", "fam")
    _, plans = budget_sweep(table, [7.0, 9.0])
    # The search names one option more than was scored (row, fp8): it has no stored fits to show.
    quantization = {"group": 32, "scale_format": "fp16", "mode": "free", "error_feedback": True,
                    "search": {"groups": [32, "row"], "modes": ["free", "fp8"]}}
    variants = build_variants(
        shapes(weights), tmp_path / "packed", quantization, fits_dir=tmp_path / "fits",
        sensitivity=table, sweep_plans=plans, comparisons={"ef_baselines": True, "uniform_without_ef": True},
    )
    hats = made(variants, weights, grams)
    assert set(variants) == {"sop_promoted", "sop6", "sop6[g32.fp16.fp8]", "sop6[row.fp16.free]", "sop_promoted@7",
                             "sop_promoted@9", "sop6_no_ef", *BASELINES, *EF_BASELINES}
    # The stored fits are what a fresh fit gives.
    fresh = quantize_layer(weights["a"], torch.eye(64, dtype=torch.float64), 6, 32, "fp16")
    assert torch.equal(hats["sop6"]["a"][0], fresh.dequantize())
    fresh_no_ef = quantize_layer(weights["a"], torch.eye(64, dtype=torch.float64), 6, 32, "fp16", error_feedback=False)
    assert torch.equal(hats["sop6_no_ef"]["a"][0], fresh_no_ef.dequantize())
    # Stored fits carry the sensitivity table's errors, which are those of the layer they give;
    # the packed plan and the fitted or rounded variants carry none (evaluate measures them).
    per_layer = layer_table(weights, grams, hats)
    for variant in ("sop6", "sop6[g32.fp16.fp8]", "sop6[row.fp16.free]", "sop_promoted@7", "sop_promoted@9"):
        for layer in weights:
            carried = hats[variant][layer].errors
            fresh_errors = per_layer.set_index(["variant", "layer"]).loc[(variant, layer), ["e_out", "mse", "acos"]]
            assert carried == pytest.approx(fresh_errors.to_dict(), rel=1e-6, abs=1e-12)
    assert all(hats[v]["a"].errors is None for v in ("sop_promoted", "sop6_no_ef", "fp8_channel", "int6_channel_ef"))
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


def test_deal_variants_balances_estimated_cost_and_shares_the_gptq_factor():
    from sopq.variants import FACTOR_COST, _error_feedback, _fitted, _packed, _rounded, _stored_fit, _variant_cost, deal_variants

    def variant(make):
        return dict.fromkeys(["a", "b"], make)

    variants = {"sop_promoted": variant(functools.partial(_packed)), "sop6_no_ef": variant(functools.partial(_fitted, None, False)),
                **{f"sop@{b}": variant(functools.partial(_stored_fit)) for b in range(4)},
                **{f"fixed{i}": variant(functools.partial(_rounded)) for i in range(8)},
                **{f"feedback{i}": variant(functools.partial(_error_feedback)) for i in range(3)}}
    parts = deal_variants(variants, 2)
    assert sorted(sum(parts, [])) == sorted(variants)
    order = list(variants)
    assert all(part == sorted(part, key=order.index) for part in parts)
    # The error-feedback variants share one worker, which computes the GPTQ factor once.
    assert [sum(name.startswith("feedback") for name in part) for part in parts] in ([3, 0], [0, 3])

    def load(part):
        costs = [_variant_cost(variants[name]) for name in part]
        return sum(cost for cost, _ in costs) + FACTOR_COST * any(factor for _, factor in costs)

    largest = max(_variant_cost(makers)[0] for makers in variants.values())
    assert abs(load(parts[0]) - load(parts[1])) <= largest
    # With as many workers as error-feedback variants, one worker holding them all would end last.
    few = {name: variants[name] for name in ["feedback0", "feedback1", "feedback2", "sop@0", "sop@1", "sop@2"]}
    assert sorted(sum(name.startswith("feedback") for name in part) for part in deal_variants(few, 3)) == [1, 1, 1]
    assert deal_variants(few, 1) == [list(few)]


@pytest.mark.parametrize("make, kind", [(make_tiny_llama, "causal_lm"), (make_tiny_bert, "encoder"),
                                        (make_tiny_gguf_dir, "causal_lm")])
def test_streaming_evaluation_equals_the_whole_model(tmp_path, make, kind, monkeypatch):
    """Block by block from disk gives the whole model's numbers: every variant's per-layer rows
    and end-to-end metrics, and every weight is back on the meta device afterwards. The
    streaming head scores one sequence at a time here, the whole model two."""
    monkeypatch.setattr(sopq.evaluate, "SCORING_TOKENS", 24)
    model_dir = make(tmp_path / "model")
    model, tokenizer = load_model(model_dir, kind)
    exclude = ["lm_head", "pooler"]
    layers = quantizable_layers(model, [".*"], exclude)
    sequences = token_sequences(tokenizer, sample_text(3000), 5, 24)
    stats, grams = collect_stats(model, layers, sequences, 2, progress=False)
    gram = {row.layer: grams[row.gram_key].double() for row in stats.drop_duplicates("layer").itertuples()}
    weights = {name: get_weight(m).clone() for name, m in layers.items()}
    packed = {name: quantize_layer(W, gram[name], 4, 32, "fp16") for name, W in weights.items()}
    write_packed(packed, tmp_path / "packed", "fam")
    quantization = {"group": 32, "scale_format": "fp16", "error_feedback": True}
    variants = build_variants(shapes(weights), tmp_path / "packed", quantization,
                              comparisons={"ef_baselines": True, "uniform_without_ef": True})
    hats = made(variants, weights, gram)
    whole = evaluate_variants(model, kind, layers, {"reference": {}, **{v: {n: h[0] for n, h in layers_.items()}
                                                                        for v, layers_ in hats.items()}},
                              sequences, 2, progress=False)

    empty, _, lazy = load_empty_model(model_dir, kind)
    per_layer, end_to_end = evaluate_streaming(empty, lazy, kind, quantizable_layers(empty, [".*"], exclude), gram,
                                               variants, sequences, 2, progress=False)
    assert all(p.is_meta for p in empty.parameters())
    pd.testing.assert_frame_equal(per_layer, layer_table(weights, gram, hats), check_exact=True)
    assert end_to_end["variant"].tolist() == ["reference", *variants]
    pd.testing.assert_frame_equal(end_to_end, whole, check_exact=False, rtol=1e-6, atol=1e-9)
    # Variants dealt out to worker processes: the same tables, in the same order.
    empty, _, lazy = load_empty_model(model_dir, kind)
    in_workers = evaluate_streaming(empty, lazy, kind, quantizable_layers(empty, [".*"], exclude), gram,
                                    variants, sequences, 2, progress=False, workers=3)
    pd.testing.assert_frame_equal(in_workers[0], per_layer, check_exact=False, rtol=1e-6, atol=1e-12)
    pd.testing.assert_frame_equal(in_workers[1], end_to_end, check_exact=False, rtol=1e-6, atol=1e-12)
    # Not trivially equal: the variants differ from the reference and from each other.
    damage = end_to_end.set_index("variant")["kl_mean" if kind == "causal_lm" else "cosine_mean"]
    assert damage.nunique() > len(variants) // 2 and damage["sop_promoted"] != damage["reference"]


def test_streaming_evaluation_holds_one_block(tmp_path):
    """While a block runs, the only real weights are that block's (the embedding/head only
    before and after the blocks): peak weight memory is one block, not the model."""
    model_dir = make_tiny_llama(tmp_path / "model", num_hidden_layers=4)
    model, tokenizer, lazy = load_empty_model(model_dir, "causal_lm")
    layers = quantizable_layers(model, [".*"], ["lm_head"])
    weights = {name: torch.zeros(get_weight(m).shape) for name, m in layers.items()}
    write_packed({name: quantize_layer(torch.randn(W.shape), torch.eye(W.shape[1], dtype=torch.float64), 4, 32, "fp16")
                  for name, W in weights.items()}, tmp_path / "packed", "fam")
    variants = build_variants(shapes(weights), tmp_path / "packed", {"group": 32, "scale_format": "fp16", "error_feedback": False})
    seen = []

    def spy(block, args):
        if next(block.parameters()).is_meta:
            return  # a stub standing in for a block: nothing runs
        real = {name for name, p in model.named_parameters() if not p.is_meta}
        seen.append(({name.split(".")[2] for name in real if name.startswith("model.layers.")},
                     {name for name in real if not name.startswith("model.layers.")}))

    for block in model.model.layers:
        block.register_forward_pre_hook(spy)
    sequences = token_sequences(tokenizer, sample_text(2000), 2, 16)
    evaluate_streaming(model, lazy, "causal_lm", layers, GramsOf(weights), variants, sequences, 2, progress=False)
    assert {i for blocks, _ in seen for i in blocks} == {"0", "1", "2", "3"}
    assert all(len(blocks) == 1 for blocks, _ in seen)
    # Only the embedding, and only while the first pass computes block 0's inputs.
    assert all(outside <= {"model.embed_tokens.weight"} for _, outside in seen)


class GramsOf(dict):
    """Identity Gram matrices of the right size for each layer."""

    def __init__(self, weights):
        super().__init__({name: torch.eye(W.shape[1], dtype=torch.float64) for name, W in weights.items()})

