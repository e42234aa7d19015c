import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from sopq.fetch import fetch_model
from sopq.model import (convert_gguf, get_weight, layer_shard, load_model, quantizable_layers, read_layer_weights,
                        run_model, set_weight, token_sequences)
from tiny_models import make_tiny_bert, make_tiny_gguf, make_tiny_llama, sample_text

LLAMA_BLOCK = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
BERT_BLOCK = ["attention.self.query", "attention.self.key", "attention.self.value",
              "attention.output.dense", "intermediate.dense", "output.dense"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_model(make_tiny_llama(tmp_path_factory.mktemp("llama")), "causal_lm")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return load_model(make_tiny_bert(tmp_path_factory.mktemp("bert")), "encoder")


def test_load_model_gives_float32_eval_models(llama, bert):
    for model, tokenizer in (llama, bert):
        assert not model.training
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert tokenizer("Good king", add_special_tokens=False)["input_ids"]
    assert type(llama[0]).__name__ == "LlamaForCausalLM"
    assert type(bert[0]).__name__ == "BertModel"


def test_load_model_rejects_bad_directories(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "missing", "causal_lm")
    with pytest.raises(ValueError, match=r"neither an HF model directory \(no config.json\) nor a single .gguf"):
        load_model(tmp_path, "causal_lm")
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files"):
        load_model(tmp_path, "causal_lm")
    with pytest.raises(ValueError, match="unknown model kind"):
        load_model(tmp_path, "seq2seq")


def test_llama_layers_in_module_order_without_tied_lm_head(llama):
    model, _ = llama
    layers = quantizable_layers(model, [".*"], [])
    assert list(layers) == [f"model.layers.{i}.{s}" for i in range(2) for s in LLAMA_BLOCK]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, hence not returned


def test_untied_lm_head_is_a_layer():
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    assert list(quantizable_layers(model, [".*"], []))[-1] == "lm_head"
    assert "lm_head" not in quantizable_layers(model, [".*"], ["lm_head", "embed"])


def test_shared_weight_returned_once():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    assert list(quantizable_layers(model, [".*"], [])) == ["0"]


def test_include_exclude_patterns(llama, bert):
    model, _ = llama
    mlp = quantizable_layers(model, ["mlp"], [])
    assert len(mlp) == 6 and all(".mlp." in name for name in mlp)
    assert len(quantizable_layers(model, ["mlp", r"\.q_proj"], ["down_proj"])) == 6
    assert list(quantizable_layers(model, [r"layers\.1\.self_attn\.o"], [])) == ["model.layers.1.self_attn.o_proj"]
    assert quantizable_layers(model, ["nothing_matches"], []) == {}

    encoder, _ = bert
    with_pooler = quantizable_layers(encoder, [".*"], [])
    assert list(with_pooler) == [f"encoder.layer.{i}.{s}" for i in range(2) for s in BERT_BLOCK] + ["pooler.dense"]
    assert "pooler.dense" not in quantizable_layers(encoder, [".*"], ["pooler"])


def test_conv1d_weights_are_transposed_and_round_trip():
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=50)).eval()
    layers = quantizable_layers(model, [".*"], [])
    assert list(layers) == ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj"]
    c_attn = layers["h.0.attn.c_attn"]
    assert isinstance(c_attn, Conv1D)
    assert c_attn.weight.shape == (32, 96) and get_weight(c_attn).shape == (96, 32)

    W = torch.randn(96, 32)
    set_weight(c_attn, W)
    assert torch.equal(get_weight(c_attn), W)
    assert torch.equal(c_attn.weight, W.T)
    assert c_attn.weight.is_contiguous()
    x = torch.randn(3, 32)
    torch.testing.assert_close(c_attn(x), x @ W.T + c_attn.bias)


def test_set_weight_keeps_dtype_and_checks_shape():
    layer = nn.Linear(8, 4).to(torch.bfloat16)
    W = torch.randn(4, 8)
    set_weight(layer, W)
    assert layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.weight, W.to(torch.bfloat16))
    with pytest.raises(ValueError, match="does not match"):
        set_weight(layer, torch.randn(8, 4))


def test_token_sequences_are_even_spread_contiguous_chunks(llama):
    _, tokenizer = llama
    text = sample_text(1000)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_chunks = len(ids) // 16
    seqs = token_sequences(tokenizer, text, 4, 16)
    assert seqs.dtype == torch.long and seqs.shape == (4, 16)
    assert torch.equal(seqs, token_sequences(tokenizer, text, 4, 16))
    for i in range(4):
        start = (i * n_chunks // 4) * 16
        assert seqs[i].tolist() == ids[start : start + 16]
    assert seqs[0].tolist() == ids[:16]
    # n_seq == number of chunks: every chunk, in order
    assert token_sequences(tokenizer, text, n_chunks, 16).flatten().tolist() == ids[: n_chunks * 16]


def test_token_sequences_short_text_error_names_counts(llama):
    _, tokenizer = llama
    text = sample_text(20)
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match=f"text has {n_tokens} tokens but 4 sequences x 64 tokens = 256"):
        token_sequences(tokenizer, text, 4, 64)


def test_run_model_rejects_sequences_longer_than_positions(bert):
    model, _ = bert
    with pytest.raises(ValueError, match="exceed the model's 256 positions"):
        run_model(model, torch.zeros(1, 257, dtype=torch.long))


def test_fetched_gguf_becomes_an_hf_directory_with_the_same_model(tmp_path):
    gguf_path = make_tiny_gguf(tmp_path / "src" / "tiny.gguf")
    from_gguf, gguf_tokenizer = load_model(gguf_path.parent, "causal_lm")
    out = tmp_path / "models" / "tiny"
    fetch_model({"local": str(gguf_path)}, out,
                convert_gguf=lambda model_dir: convert_gguf(model_dir, "causal_lm"))
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "gguf" / "tiny.gguf").read_bytes() == gguf_path.read_bytes()  # kept for provenance
    assert not list(out.glob("*.gguf"))
    converted, tokenizer = load_model(out, "causal_lm")
    expected = from_gguf.state_dict()
    assert converted.state_dict().keys() == expected.keys()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in converted.state_dict().items())
    text = "hello world, well held"
    assert tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]


@pytest.mark.parametrize("n, shards", [(14, 1), (14, 2), (14, 3), (5, 5)])
def test_layer_shards_cover_every_layer_once_in_order(n, shards):
    names = [f"layer{i}" for i in range(n)]
    parts = [layer_shard(names, i, shards) for i in range(shards)]
    assert sum(parts, []) == names
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="not in"):
        layer_shard(names, shards, shards)
    with pytest.raises(ValueError, match=f"shards: {n + 1} is more than the {n} layers"):
        layer_shard(names, 0, n + 1)


@pytest.mark.parametrize("make, kind", [(make_tiny_llama, "causal_lm"), (make_tiny_bert, "encoder")])
def test_read_layer_weights_equals_the_loaded_model(tmp_path, make, kind):
    """Lazily read weights (one tensor at a time, nothing else loaded) equal load_model's."""
    model_dir = make(tmp_path / "model")
    model, _ = load_model(model_dir, kind)
    layers = quantizable_layers(model, [".*"], ["lm_head", "embed"])
    every = read_layer_weights(model_dir, kind, [".*"], ["lm_head", "embed"])
    assert list(every) == list(layers)
    for name, W in every.items():
        assert torch.equal(W, get_weight(layers[name])), name
    second = read_layer_weights(model_dir, kind, [".*"], ["lm_head", "embed"], lambda names: layer_shard(names, 1, 2))
    assert list(second) == layer_shard(list(layers), 1, 2)
    with pytest.raises(ValueError, match="not quantizable layers"):
        read_layer_weights(model_dir, kind, [".*"], ["lm_head", "embed"], lambda names: ["no.such.layer"])


def test_lazily_read_nan_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = make_tiny_llama(tmp_path / "model")
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj.weight has NaN or Inf entries"):
        read_layer_weights(model_dir, "causal_lm", [".*"], ["lm_head"])
