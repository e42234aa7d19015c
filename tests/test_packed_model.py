"""sopq.load and export_dequantized on a tiny llama packed through the library (the workflow test
checks the same against the evaluate stage's own numbers)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import sopq
from sopq.evaluate import evaluate_variants
from sopq.model import get_weight, load_model, quantizable_layers, token_sequences
from sopq.packed_model import PackedLinear, export_dequantized, load_tokenizer
from sopq.quantize import quantize_layer
from sopq.store import PackedFormatError, read_packed, write_packed
from tiny_models import make_tiny_llama, sample_text

# Per-layer formats cover every bit width the loader must decode and every scale format.
FORMATS = [(4, 32, "fp16"), (5, 16, "e8m0"), (6, 64, "bf16"), (7, 32, "fp16"), (8, 128, "e8m0")]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed_model")
    model_dir = make_tiny_llama(root / "models" / "llama")
    model, _ = load_model(model_dir, "causal_lm")
    layers = quantizable_layers(model, [".*"], [])
    fitted = {}
    for i, (name, module) in enumerate(layers.items()):
        W = get_weight(module)
        bits, group, scale_format = FORMATS[i % len(FORMATS)]
        fitted[name] = quantize_layer(W, torch.eye(W.shape[1], dtype=torch.float64), bits, group, scale_format,
                                      error_feedback=False)
    packed_dir = root / "results" / "llama" / "packed"
    write_packed(fitted, packed_dir, "llama", {"model": model_dir, "kind": "causal_lm"})
    return packed_dir, model_dir


def test_manifest_points_to_the_source_model_relative_to_itself(packed):
    packed_dir, model_dir = packed
    source = json.loads((packed_dir / "manifest.json").read_text())["source"]
    assert source == {"model": "../../../models/llama", "kind": "causal_lm"}
    assert (packed_dir / source["model"]).resolve() == model_dir.resolve()


def test_loaded_model_computes_from_codes_and_matches_the_evaluate_harness(packed):
    packed_dir, model_dir = packed
    loaded = sopq.load(packed_dir)
    manifest_layers = json.loads((packed_dir / "manifest.json").read_text())["layers"]
    replaced = {name for name, m in loaded.named_modules() if isinstance(m, PackedLinear)}
    assert replaced == set(manifest_layers)
    # No float copy of a packed weight is kept.
    assert not any(name.removesuffix(".weight") in replaced for name, _ in loaded.named_parameters())

    # The evaluate stage's way: W_hat written into the original model's weights.
    model, tokenizer = load_model(model_dir, "causal_lm")
    layers = quantizable_layers(model, [".*"], [])
    variant = {name: q.dequantize() for name, q in read_packed(packed_dir).items()}
    sequences = token_sequences(tokenizer, sample_text(3000, seed=3), 4, 32)
    staged = evaluate_variants(model, "causal_lm", layers, {"sop": variant}, sequences, 2, progress=False)
    through_load = evaluate_variants(loaded, "causal_lm", {}, {"loaded": {}}, sequences, 2, progress=False)
    assert through_load["ppl"].item() == pytest.approx(staged["ppl"].item(), rel=1e-6)
    assert staged["kl_mean"].item() > 0  # the variant really differs from the unquantized model


def test_generate_runs_on_the_packed_model(packed):
    packed_dir, _ = packed
    model, tokenizer = sopq.load(packed_dir), load_tokenizer(packed_dir)
    prompt = tokenizer("the king", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 5)


def test_kernel_path_matches_the_torch_fallback(packed):
    """The Triton LUT matmul (interpreter on CPU) and the fallback agree on a packed layer."""
    packed_dir, _ = packed
    model = sopq.load(packed_dir)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    fallback = layer(x)
    layer.kernel = True
    kernel = layer(x)
    assert kernel.shape == fallback.shape == (3, 5, layer.out_features)
    torch.testing.assert_close(kernel, fallback, rtol=1e-5, atol=1e-5)


def test_export_writes_a_plain_checkpoint_with_the_dequantized_weights(packed, tmp_path):
    from transformers import AutoModelForCausalLM

    packed_dir, _ = packed
    export_dequantized(packed_dir, tmp_path / "dequantized")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "dequantized").iterdir()}
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized")
    state = load_file(tmp_path / "dequantized" / "model.safetensors")
    for name, q in read_packed(packed_dir).items():
        assert torch.equal(state[f"{name}.weight"], q.dequantize()), name
    loaded = sopq.load(packed_dir)
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    torch.testing.assert_close(exported(ids).logits, loaded(ids).logits, rtol=1e-5, atol=1e-5)


def test_missing_source_model_says_to_pass_model_dir(packed, tmp_path):
    packed_dir, model_dir = packed
    moved = tmp_path / "elsewhere" / "packed"
    shutil.copytree(packed_dir, moved)
    with pytest.raises(PackedFormatError, match=r"source model .* is not there; pass model_dir="):
        sopq.load(moved)
    assert isinstance(sopq.load(moved, model_dir=model_dir), torch.nn.Module)


def test_packed_from_another_model_is_refused(packed, tmp_path):
    from tiny_models import make_tiny_bert

    packed_dir, _ = packed
    other = make_tiny_bert(tmp_path / "bert")
    with pytest.raises(PackedFormatError, match="layer model.layers.0.self_attn.q_proj is not in the model"):
        sopq.load(packed_dir, model_dir=other)


def test_dtype_casts_keep_the_stored_codebook_and_scales(packed):
    """model.to(bfloat16) casts activations and biases, never the stored fp16/bf16 tables."""
    packed_dir, _ = packed
    model = sopq.load(packed_dir)
    before = {name: (m.codebook.clone(), m.scales.clone()) for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    model.to(torch.bfloat16)
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear):
            assert torch.equal(m.codebook, before[name][0]) and m.codebook.dtype == torch.float16
            assert torch.equal(m.scales, before[name][1]) and m.scales.dtype == before[name][1].dtype
    assert model(torch.tensor([[1, 5, 9]])).logits.dtype == torch.bfloat16


def test_packed_dir_without_a_recorded_source_needs_model_dir_and_kind(packed, tmp_path):
    packed_dir, model_dir = packed
    old = tmp_path / "packed"
    shutil.copytree(packed_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["source"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackedFormatError, match="names no source model; pass model_dir="):
        sopq.load(old)
    with pytest.raises(PackedFormatError, match="does not record the model kind; pass kind="):
        sopq.load(old, model_dir=model_dir)
    model = sopq.load(old, model_dir=model_dir, kind="causal_lm")
    assert any(isinstance(m, PackedLinear) for m in model.modules())
