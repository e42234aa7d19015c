import math

import numpy as np
import pytest
import torch

import sopq.evaluate
from sopq.calibrate import collect_stats
from sopq.evaluate import (evaluate_variants, measure_layer_importance, probe_layer_importance,
                           probe_layer_importance_streaming)
from sopq.model import get_weight, load_empty_model, load_model, quantizable_layers, run_model, token_sequences
from tiny_models import make_tiny_bert, make_tiny_gguf_dir, make_tiny_llama, sample_text


def setup(model_dir, kind, exclude):
    model, tokenizer = load_model(model_dir, kind)
    layers = quantizable_layers(model, [".*"], exclude)
    sequences = token_sequences(tokenizer, sample_text(3000), 6, 32)
    stats, grams = collect_stats(model, layers, sequences, 6, progress=False)
    key_of = stats.drop_duplicates("layer").set_index("layer")["gram_key"]
    return model, layers, sequences, {name: grams[key_of[name]] for name in layers}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return setup(make_tiny_llama(tmp_path_factory.mktemp("llama")), "causal_lm", [])


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return setup(make_tiny_bert(tmp_path_factory.mktemp("bert")), "encoder", ["pooler"])


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert all(torch.equal(after[name], before[name]) for name in before)


def noisy(layers, names, std, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {n: get_weight(layers[n]) + std * torch.randn(get_weight(layers[n]).shape, generator=generator)
            for n in names}


def test_causal_metrics_match_hand_computation(llama):
    model, layers, sequences, _ = llama
    before = snapshot(model)
    perturbed = noisy(layers, layers, 0.02)
    table = evaluate_variants(model, "causal_lm", layers, {"reference": {}, "noisy": perturbed},
                              sequences, batch_size=4, progress=False)
    assert list(table.columns) == ["variant", "ppl", "kl_mean", "kl_p99", "top1"]
    assert table["variant"].tolist() == ["reference", "noisy"]
    assert_unchanged(model, before)

    with torch.no_grad():
        ref_logits = run_model(model, sequences).logits[:, :-1].double()
        for name, W in perturbed.items():
            get_weight(layers[name]).copy_(W)
        noisy_logits = run_model(model, sequences).logits[:, :-1].double()
        model.load_state_dict(before)
    targets = sequences[:, 1:]
    ref_ppl = math.exp(torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), targets.flatten()))
    noisy_ppl = math.exp(torch.nn.functional.cross_entropy(noisy_logits.flatten(0, 1), targets.flatten()))
    p_ref = ref_logits.softmax(-1)
    token_kl = (p_ref * (p_ref.log() - noisy_logits.log_softmax(-1))).sum(-1).flatten()

    ref, var = table.iloc[0], table.iloc[1]
    assert ref.kl_mean == 0 and ref.kl_p99 == 0 and ref.top1 == 1
    assert ref.ppl == pytest.approx(ref_ppl, rel=1e-5)
    assert var.ppl == pytest.approx(noisy_ppl, rel=1e-5)
    assert var.kl_mean == pytest.approx(float(token_kl.mean()), rel=1e-4)
    assert var.kl_p99 == pytest.approx(float(token_kl.quantile(0.99)), rel=1e-4)
    assert var.kl_mean > 1e-3 and var.kl_p99 > var.kl_mean
    agree = (ref_logits.argmax(-1) == noisy_logits.argmax(-1)).double().mean()
    assert var.top1 == pytest.approx(float(agree)) and var.top1 < 1


def test_single_layer_variant_and_batching(llama):
    model, layers, sequences, _ = llama
    one = {"noisy_down": noisy(layers, ["model.layers.1.mlp.down_proj"], 0.05)}
    by_2 = evaluate_variants(model, "causal_lm", layers, one, sequences, batch_size=2, progress=False)
    by_6 = evaluate_variants(model, "causal_lm", layers, one, sequences, batch_size=6, progress=False)
    assert by_2.iloc[0].kl_mean > 0
    assert by_2.iloc[0].kl_mean == pytest.approx(by_6.iloc[0].kl_mean, rel=1e-4)
    assert by_2.iloc[0].top1 == pytest.approx(by_6.iloc[0].top1)


def test_weights_restored_when_a_variant_fails(llama):
    model, layers, sequences, _ = llama
    before = snapshot(model)
    first, second = list(layers)[:2]
    bad = {first: get_weight(layers[first]) + 1.0, second: torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="does not match"):
        evaluate_variants(model, "causal_lm", layers, {"bad": bad}, sequences, 6, progress=False)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="not quantizable layers"):
        evaluate_variants(model, "causal_lm", layers, {"x": {"lm_head": torch.zeros(1)}}, sequences, 6, False)


def test_encoder_cosine(bert):
    model, layers, sequences, _ = bert
    before = snapshot(model)
    table = evaluate_variants(model, "encoder", layers, {"reference": {}, "noisy": noisy(layers, layers, 0.05)},
                              sequences, batch_size=4, progress=False)
    assert list(table.columns) == ["variant", "cosine_mean", "cosine_min"]
    ref, var = table.iloc[0], table.iloc[1]
    assert ref.cosine_mean == 1 and ref.cosine_min == 1
    assert var.cosine_min <= var.cosine_mean < 1 - 1e-4
    assert_unchanged(model, before)


@pytest.mark.parametrize("fixture, kind", [("llama", "causal_lm"), ("bert", "encoder")])
def test_layer_importance_is_positive_and_linear(request, fixture, kind):
    model, layers, sequences, grams = request.getfixturevalue(fixture)
    before = snapshot(model)
    small = measure_layer_importance(model, kind, layers, sequences, grams, 1e-3, seed=0, progress=False)
    large = measure_layer_importance(model, kind, layers, sequences, grams, 4e-3, seed=0, progress=False)
    assert list(small) == list(layers)
    assert all(alpha > 0 for alpha in small.values())
    for name in layers:
        assert 1 / 1.5 < large[name] / small[name] < 1.5, name
    again = measure_layer_importance(model, kind, layers, sequences, grams, 1e-3, 0, batch_size=2, progress=False)
    assert again == pytest.approx(small, rel=1e-4)
    assert_unchanged(model, before)


def test_importance_noise_has_the_requested_output_error(llama, monkeypatch):
    model, layers, sequences, grams = llama
    name = "model.layers.0.self_attn.k_proj"
    W = get_weight(layers[name]).clone().double()
    written = []
    real_set_weight = sopq.evaluate.set_weight
    monkeypatch.setattr(sopq.evaluate, "set_weight",
                        lambda module, W_new: (written.append(W_new.clone()), real_set_weight(module, W_new)))
    measure_layer_importance(model, "causal_lm", {name: layers[name]}, sequences[:2], grams, 2e-3, seed=3,
                             progress=False)
    noisy_W, restored = written[0].double(), written[1]
    H = grams[name].double()
    dW = noisy_W - W
    assert float(((dW @ H) * dW).sum() / ((W @ H) * W).sum()) == pytest.approx(2e-3, rel=1e-3)
    assert torch.equal(restored, W.float())

    other_seed = []
    monkeypatch.setattr(sopq.evaluate, "set_weight", lambda module, W_new: other_seed.append(W_new.clone()))
    measure_layer_importance(model, "causal_lm", {name: layers[name]}, sequences[:2], grams, 2e-3, seed=4,
                             progress=False)
    assert not torch.equal(other_seed[0], written[0])


def test_importance_input_errors(llama):
    model, layers, sequences, grams = llama
    with pytest.raises(ValueError, match="rel_error must be positive"):
        measure_layer_importance(model, "causal_lm", layers, sequences, grams, 0.0, seed=0)
    with pytest.raises(ValueError, match="no Gram matrix for layer"):
        measure_layer_importance(model, "causal_lm", layers, sequences, {}, 1e-3, seed=0)
    with pytest.raises(ValueError, match="unknown model kind"):
        measure_layer_importance(model, "decoder", layers, sequences, grams, 1e-3, seed=0)


@pytest.mark.parametrize("fixture, kind", [("llama", "causal_lm"), ("bert", "encoder")])
def test_probe_importance_agrees_with_noise_injection(request, fixture, kind):
    # Two measurements of the same alpha: second order from probe gradients, and the damage of
    # real noise injected one layer at a time. Small noise keeps the latter in its linear range.
    model, layers, sequences, grams = request.getfixturevalue(fixture)
    before = snapshot(model)
    noise = measure_layer_importance(model, kind, layers, sequences, grams, 1e-3, seed=0, progress=False)
    probe = probe_layer_importance(model, kind, layers, sequences, grams, seed=0, n_probes=8, progress=False)
    assert list(probe) == list(layers)
    x = np.log([probe[name] for name in layers])
    y = np.log([noise[name] for name in layers])
    assert np.corrcoef(x, y)[0, 1] > 0.95
    assert 0.8 < np.exp(np.median(x - y)) < 1.25
    assert probe_layer_importance(model, kind, layers, sequences, grams, seed=0, n_probes=8, progress=False) == probe
    assert all(not module.weight.requires_grad for module in layers.values())
    assert_unchanged(model, before)


@pytest.mark.parametrize("make, kind", [(make_tiny_llama, "causal_lm"), (make_tiny_bert, "encoder"),
                                        (make_tiny_gguf_dir, "causal_lm")])
def test_probe_importance_block_by_block_equals_the_whole_model(tmp_path, make, kind):
    """Backpropagating one block at a time from disk gives the whole model's gradients, with
    the same probes, over several batches."""
    model_dir = make(tmp_path / "model")
    model, layers, sequences, grams = setup(model_dir, kind, ["lm_head", "pooler"])
    whole = probe_layer_importance(model, kind, layers, sequences, grams, seed=3, n_probes=3, batch_size=4, progress=False)
    empty, _, weights = load_empty_model(model_dir, kind)
    streamed = probe_layer_importance_streaming(empty, weights, kind, quantizable_layers(empty, [".*"], ["lm_head", "pooler"]),
                                                sequences, grams, seed=3, n_probes=3, batch_size=4, progress=False)
    assert all(p.is_meta for p in empty.parameters())
    assert list(streamed) == list(whole)
    np.testing.assert_allclose([streamed[n] for n in whole], [whole[n] for n in whole], rtol=1e-5)
    assert len(set(whole.values())) == len(whole) and min(whole.values()) > 0  # real, distinct values
