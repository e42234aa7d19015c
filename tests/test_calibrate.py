import runpy
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from torch import nn

from sopq.calibrate import collect_stats, collect_stats_streaming, load_gram
from sopq.io import save_safetensors
from sopq.model import load_empty_model, load_model, quantizable_layers, run_model, token_sequences
from tiny_models import make_tiny_bert, make_tiny_gguf_dir, make_tiny_llama, sample_text

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llama(llama_dir):
    model, tokenizer = load_model(llama_dir, "causal_lm")
    layers = quantizable_layers(model, [".*"], [])
    sequences = token_sequences(tokenizer, sample_text(2000), 5, 24)
    stats, grams = collect_stats(model, layers, sequences, batch_size=2, progress=False)
    return model, layers, sequences, stats, grams


def layer_inputs(model, layers, sequences):
    """Every layer's input over all sequences, captured in one plain forward pass."""
    captured = {}
    def hook(module, args, name):
        captured[name] = args[0].reshape(-1, args[0].shape[-1])

    handles = [m.register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n, m in layers.items()]
    with torch.no_grad():
        run_model(model, sequences)
    for h in handles:
        h.remove()
    return captured


def test_stats_table_columns_and_rows(llama):
    _, layers, sequences, stats, _ = llama
    assert list(stats.columns) == ["layer", "gram_key", "channel", "mean", "mean_sq", "absmax", "tokens"]
    assert list(stats["layer"].unique()) == list(layers)
    assert len(stats) == sum(m.in_features for m in layers.values())
    assert (stats["tokens"] == sequences.numel()).all()
    down = stats[stats["layer"] == "model.layers.0.mlp.down_proj"]
    assert down["channel"].tolist() == list(range(128))


def test_qkv_and_gate_up_share_one_gram(llama):
    _, layers, _, stats, grams = llama
    key_of = stats.drop_duplicates("layer").set_index("layer")["gram_key"]
    for i in range(2):
        p = f"model.layers.{i}."
        for s in ("q_proj", "k_proj", "v_proj"):
            assert key_of[p + "self_attn." + s] == p + "self_attn.q_proj"
        assert key_of[p + "self_attn.o_proj"] == p + "self_attn.o_proj"
        assert key_of[p + "mlp.gate_proj"] == key_of[p + "mlp.up_proj"] == p + "mlp.gate_proj"
        assert key_of[p + "mlp.down_proj"] == p + "mlp.down_proj"
    assert sorted(grams) == sorted(set(key_of))
    assert len(grams) == 8


def test_gram_and_moments_equal_hand_computation(llama):
    model, layers, sequences, stats, grams = llama
    inputs = layer_inputs(model, layers, sequences)
    for name, key in [("model.layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj"),
                      ("model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.q_proj")]:
        X = inputs[name].double()
        T = X.shape[0]
        assert grams[key].dtype == torch.float32 and grams[key].shape == (X.shape[1], X.shape[1])
        torch.testing.assert_close(grams[key], (X.T @ X / T).float(), rtol=1e-5, atol=1e-6)
        rows = stats[stats["layer"] == name]
        torch.testing.assert_close(torch.tensor(rows["mean"].values), X.mean(0))
        torch.testing.assert_close(torch.tensor(rows["mean_sq"].values), X.square().mean(0))
        torch.testing.assert_close(torch.tensor(rows["absmax"].values), X.abs().amax(0))
        torch.testing.assert_close(torch.tensor(rows["mean_sq"].values).float(), grams[key].diagonal())


def test_stats_do_not_depend_on_batching(llama):
    model, layers, sequences, stats, grams = llama
    stats_one, grams_one = collect_stats(model, layers, sequences, batch_size=5, progress=False)
    pd.testing.assert_frame_equal(stats_one, stats, rtol=1e-6)
    for key in grams:
        torch.testing.assert_close(grams_one[key], grams[key], rtol=1e-5, atol=1e-6)


def test_bert_qkv_share_one_gram(tmp_path):
    model, tokenizer = load_model(make_tiny_bert(tmp_path), "encoder")
    layers = quantizable_layers(model, [".*"], ["pooler"])
    sequences = token_sequences(tokenizer, sample_text(500), 2, 16)
    stats, grams = collect_stats(model, layers, sequences, 2, progress=False)
    key_of = stats.drop_duplicates("layer").set_index("layer")["gram_key"]
    for s in ("query", "key", "value"):
        assert key_of[f"encoder.layer.1.attention.self.{s}"] == "encoder.layer.1.attention.self.query"
    assert len(grams) == 2 * 4


class Toy(nn.Module):
    """a and b read the same tensor; c reads it after an in-place edit; d reads an equal copy."""

    config = SimpleNamespace()

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.a, self.b, self.c, self.d, self.unused = (nn.Linear(4, 4) for _ in range(5))

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        y = self.a(x) + self.b(x)
        x.mul_(2)
        return y + self.c(x) + self.d(x.clone())


def test_sharing_needs_the_same_unmodified_tensor():
    model = Toy()
    ids = torch.arange(10).reshape(2, 5)
    layers = dict(list(model.named_children())[1:5])
    stats, grams = collect_stats(model, layers, ids, batch_size=1, progress=False)
    key_of = stats.drop_duplicates("layer").set_index("layer")["gram_key"].to_dict()
    assert key_of == {"a": "a", "b": "a", "c": "c", "d": "d"}
    torch.testing.assert_close(grams["c"], 4 * grams["a"])
    torch.testing.assert_close(grams["d"], grams["c"])


def test_layer_never_called_is_an_error():
    model = Toy()
    with pytest.raises(ValueError, match=r"never called.*unused"):
        collect_stats(model, {"a": model.a, "unused": model.unused}, torch.zeros(1, 3, dtype=torch.long), 1, False)


def test_load_gram_reads_one_tensor(tmp_path):
    path = tmp_path / "grams.safetensors"
    save_safetensors({"x.q": torch.eye(3), "x.down": torch.ones(5, 5)}, path)
    assert torch.equal(load_gram(path, "x.q"), torch.eye(3))
    with pytest.raises(ValueError, match="'x.k' is not in"):
        load_gram(path, "x.k")


def run_calibrate_script(llama_dir, tmp_path, streaming):
    """Run workflow/scripts/calibrate.py on the tiny llama, check its outputs; (stats, grams path)."""
    tmp_path.mkdir(exist_ok=True)
    text = tmp_path / "calib.txt"
    text.write_text(sample_text(2000))
    out = tmp_path / "calib"
    snakemake = SimpleNamespace(
        input=SimpleNamespace(model=str(llama_dir), text=str(text)),
        output=SimpleNamespace(stats=str(out / "stats.parquet"), grams=str(out / "grams.safetensors")),
        params=SimpleNamespace(kind="causal_lm", include=[".*"], exclude=["lm_head", "embed"], n_seq=5,
                               seq_len=24, batch_size=2, trust_remote_code=False, seed=0, streaming=streaming),
        log=[str(tmp_path / "calibrate.log")],
        threads=1,
    )
    runpy.run_path(str(REPO / "workflow/scripts/calibrate.py"), init_globals={"snakemake": snakemake})
    stats = pd.read_parquet(out / "stats.parquet")
    assert stats["layer"].nunique() == 14
    key = "model.layers.0.mlp.gate_proj"
    gram = load_gram(out / "grams.safetensors", key)
    assert gram.shape == (64, 64)
    mean_sq = stats.loc[stats["layer"] == "model.layers.0.mlp.up_proj", "mean_sq"].values
    torch.testing.assert_close(gram.diagonal(), torch.tensor(mean_sq, dtype=torch.float32))
    log = (tmp_path / "calibrate.log").read_text()
    assert ("calibrate (blocks): 100%" if streaming else "calibrate: 100%") in log  # the progress bar went to the log
    return stats, out / "grams.safetensors"


@pytest.mark.parametrize("streaming", [False, True])
def test_workflow_script_writes_stats_and_grams(llama_dir, tmp_path, streaming):
    run_calibrate_script(llama_dir, tmp_path, streaming)


def test_workflow_script_streaming_writes_the_same_files(llama_dir, tmp_path):
    """The block-by-block writer (safetensors written one tensor at a time) gives the same file
    contents as writing all Grams at once."""
    stats, grams = run_calibrate_script(llama_dir, tmp_path / "whole", False)
    s_stats, s_grams = run_calibrate_script(llama_dir, tmp_path / "streaming", True)
    pd.testing.assert_frame_equal(s_stats, stats, check_exact=True)
    with safe_open(str(grams), "pt") as whole, safe_open(str(s_grams), "pt") as streamed:
        assert sorted(streamed.keys()) == sorted(whole.keys())
        for key in whole.keys():
            assert torch.equal(streamed.get_tensor(key), whole.get_tensor(key)), key


def stats_both_ways(model_dir, kind, exclude, batch_size=2):
    """(in-memory stats, grams), (streaming stats, grams) of one model on the same sequences."""
    model, tokenizer = load_model(model_dir, kind)
    sequences = token_sequences(tokenizer, sample_text(2000), 5, 24)
    whole = collect_stats(model, quantizable_layers(model, [".*"], exclude), sequences, batch_size, progress=False)
    empty, _, weights = load_empty_model(model_dir, kind)
    assert all(p.is_meta for p in empty.parameters())
    streamed = collect_stats_streaming(empty, weights, quantizable_layers(empty, [".*"], exclude), sequences,
                                       batch_size, progress=False)
    assert all(p.is_meta for p in empty.parameters())  # every block was released again
    return whole, streamed


@pytest.mark.parametrize("make, kind", [(make_tiny_llama, "causal_lm"), (make_tiny_bert, "encoder"),
                                        (make_tiny_gguf_dir, "causal_lm")])
def test_streaming_equals_whole_model(tmp_path, make, kind):
    """Block by block gives the very same numbers: the same operations on the same inputs, in the
    same order (tolerance 0; the real SmolLM2 GGUF, MiniLM and MPNet agree bitwise too, see
    bench/RESULTS-streaming.md)."""
    (stats, grams), (s_stats, s_grams) = stats_both_ways(make(tmp_path / "model"), kind, ["lm_head", "embed", "pooler"])
    pd.testing.assert_frame_equal(s_stats, stats, check_exact=True)
    assert list(s_grams) == list(grams)
    for key in grams:
        assert torch.equal(s_grams[key], grams[key]), key


def test_streaming_reads_no_weight_outside_the_walk(tmp_path):
    """The tied LM head / final norm are never read; the embedding is read and given back."""
    model_dir = make_tiny_llama(tmp_path / "model")
    empty, tokenizer, weights = load_empty_model(model_dir, "causal_lm")
    read = []
    tensor = weights.tensor
    weights.tensor = lambda name: read.append(name) or tensor(name)
    sequences = token_sequences(tokenizer, sample_text(2000), 2, 16)
    collect_stats_streaming(empty, weights, quantizable_layers(empty, [".*"], ["lm_head"]), sequences, 2, progress=False)
    assert "model.embed_tokens.weight" in read
    assert not any(n.startswith(("lm_head", "model.norm")) for n in read)
    assert len(read) == len(set(read))  # each tensor read once


def test_streaming_rejects_layers_outside_the_blocks(tmp_path):
    empty, tokenizer, weights = load_empty_model(make_tiny_bert(tmp_path / "bert"), "encoder")
    layers = quantizable_layers(empty, [".*"], [])  # the pooler sits after the blocks
    with pytest.raises(ValueError, match=r"outside the model's blocks.*pooler.*streaming: false"):
        collect_stats_streaming(empty, weights, layers, token_sequences(tokenizer, sample_text(500), 1, 8), 1)
