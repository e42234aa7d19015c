"""Bad input through the library as the pipeline stages call it, each with the error a user sees:
damaged model files, NaN/Inf weights, all-zero and constant layers, partial scale groups, and a
damaged packed directory at load. (Config errors: test_config.py; checksums at fetch:
test_fetch.py; SIGKILL, resume and determinism: test_workflow.py; random bytes into the packed
reader: test_store.py.)"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import sopq
from sopq.calibrate import collect_stats
from sopq.evaluate import measure_layer_importance, probe_layer_importance
from sopq.model import get_weight, load_model, quantizable_layers, set_weight, token_sequences
from sopq.packed_model import PackedLinear
from sopq.promote import promote
from sopq.quantize import quantize_layer
from sopq.sensitivity import FitOption, load_fits, plan_keys, score_layers
from sopq.store import PackedFormatError, read_packed, write_packed
from tiny_models import make_tiny_llama, sample_text


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("robust") / "llama")


def damaged_copy(llama_dir, tmp_path, damage) -> object:
    model_dir = tmp_path / "llama"
    shutil.copytree(llama_dir, model_dir)
    damage(model_dir / "model.safetensors")
    return model_dir


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def poison(value):
    def damage(path):
        state = load_file(path)
        state["model.layers.1.mlp.up_proj.weight"][3, 7] = value
        save_file(state, path, metadata={"format": "pt"})
    return damage


@pytest.mark.parametrize("damage", [truncate, lambda p: p.unlink(), lambda p: p.write_bytes(b"\x07" * 64)],
                         ids=["truncated", "missing", "garbage"])
def test_damaged_model_file_says_to_refetch(llama_dir, tmp_path, damage):
    model_dir = damaged_copy(llama_dir, tmp_path, damage)
    with pytest.raises(ValueError, match=rf"cannot load the model in {model_dir} .*: a weights file is missing, "
                                         rf"truncated or corrupt; delete {model_dir} and rerun the fetch stage"):
        load_model(model_dir, "causal_lm")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_weight_names_the_parameter(llama_dir, tmp_path, value):
    model_dir = damaged_copy(llama_dir, tmp_path, poison(value))
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight has NaN or Inf entries; "
                                         r"the checkpoint is damaged: fix or re-fetch it"):
        load_model(model_dir, "causal_lm")


IMPORTANCE = {
    "noise": lambda *args: measure_layer_importance(*args, 1e-3, 0, progress=False),
    "probe": lambda *args: probe_layer_importance(*args, 0, progress=False),
}


@pytest.mark.parametrize("importance", IMPORTANCE)
def test_zero_and_constant_layers_go_through_every_stage(llama_dir, tmp_path, importance):
    """importance -> sensitivity -> promote -> fit -> pack -> load, with one all-zero and one
    constant layer: the zero layer costs nothing at any width and decodes to exactly zero."""
    model, tokenizer = load_model(llama_dir, "causal_lm")
    layers = quantizable_layers(model, [r"layers\.0\.self_attn\.(q|o)_proj", r"layers\.0\.mlp\.up_proj"], [])
    zero, constant, normal = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.up_proj"
    set_weight(layers[zero], torch.zeros_like(get_weight(layers[zero])))
    set_weight(layers[constant], torch.full_like(get_weight(layers[constant]), 0.05))
    sequences = token_sequences(tokenizer, sample_text(2000), 4, 32)
    stats, grams = collect_stats(model, layers, sequences, batch_size=4, progress=False)
    gram_of = stats.drop_duplicates("layer").set_index("layer")["gram_key"]
    gram = {name: grams[gram_of[name]].double() for name in layers}

    alpha = IMPORTANCE[importance](model, "causal_lm", layers, sequences[:2], gram)
    assert alpha[zero] == 0 and alpha[constant] > 0 and alpha[normal] > 0

    weights = {name: get_weight(m) for name, m in layers.items()}
    table = score_layers(weights, gram, [4, 6], [FitOption(32, "fp16")], True, fits_dir=tmp_path / "fits")
    table["alpha"] = table["layer"].map(alpha)
    by_layer = table.set_index(["layer", "bits"])["e_out"]
    assert by_layer[zero].tolist() == [0.0, 0.0]
    assert by_layer[constant].max() < 1e-6  # one distinct value: the codebook holds it
    assert by_layer[normal].min() > 0

    plan = promote(table, 5.0)
    assert plan.set_index("layer").loc[zero, "bits"] == 4  # promoting a zero layer buys nothing
    write_packed(load_fits(tmp_path / "fits", plan_keys(plan)), tmp_path / "packed", "llama")
    packed = read_packed(tmp_path / "packed")
    assert torch.equal(packed[zero].dequantize(), torch.zeros_like(weights[zero]))
    torch.testing.assert_close(packed[constant].dequantize(), weights[constant], rtol=1e-3, atol=0)


@pytest.mark.parametrize("k, group", [(40, 32), (72, 64), (100, 100)])
def test_inputs_not_divisible_by_the_group_load_and_run(k, group):
    """A partial last scale group: the loaded layer (fallback and Triton kernel) computes W_hat."""
    g = torch.Generator().manual_seed(k)
    W = torch.randn(24, k, generator=g)
    q = quantize_layer(W, torch.eye(k, dtype=torch.float64), 6, group, "e8m0")
    from sopq.packing import pack_codes

    meta = {"bits": 6, "group": q.group, "scale_format": "e8m0", "shape": [24, k]}
    layer = PackedLinear(meta, pack_codes(q.codes, 6), q.codebook, q.scales, torch.randn(24, generator=g))
    x = torch.randn(2, 3, k, generator=g)
    expected = torch.nn.functional.linear(x, q.dequantize(), layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    layer.kernel = True
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def packed_dir(llama_dir, tmp_path_factory):
    model, _ = load_model(llama_dir, "causal_lm")
    layers = quantizable_layers(model, [r"layers\.0\.mlp"], [])
    fitted = {name: quantize_layer(get_weight(m), torch.eye(get_weight(m).shape[1], dtype=torch.float64), 5, 32, "fp16")
              for name, m in layers.items()}
    out = tmp_path_factory.mktemp("packed") / "packed"
    write_packed(fitted, out, "llama", {"model": llama_dir, "kind": "causal_lm"})
    return out


def test_truncated_or_tampered_packed_file_is_refused_at_load(packed_dir, tmp_path):
    damaged = tmp_path / "packed"
    shutil.copytree(packed_dir, damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["source"]["model"] = str((packed_dir / manifest["source"]["model"]).resolve())
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    weights = damaged / "model.safetensors"
    good = weights.read_bytes()
    assert isinstance(sopq.load(damaged), torch.nn.Module)
    for bad in (good[: len(good) // 2], good[:-1] + bytes([good[-1] ^ 1])):
        weights.write_bytes(bad)
        with pytest.raises(PackedFormatError, match=rf"{weights}: missing or sha256 mismatch with the manifest; rerun the pack stage"):
            sopq.load(damaged)
    weights.unlink()
    with pytest.raises(PackedFormatError, match="missing or sha256 mismatch"):
        sopq.load(damaged)
    (damaged / "manifest.json").write_text("{not json")
    with pytest.raises(PackedFormatError, match="cannot read the manifest"):
        sopq.load(damaged)
