"""Tiny random transformers saved to a directory, for tests and the workflow test.

    python tests/tiny_models.py {llama,bert} DIR    # writes a model directory
    python tests/tiny_models.py text FILE [WORDS]   # writes sample text
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

_WORDS = (
    "the a of and to in is was he she it that his her with as for on be at by this had not are but "
    "from or have an they which one you were all we there when their what so if out up into about "
    "king queen lord lady sword crown night day love death blood heart honour grace speak hear come "
    "go make know think give take tell good great true noble gentle sweet fair foul dark bright old "
    "young father mother son daughter brother friend enemy castle field battle peace war letter time"
).split()


def sample_text(n_words: int = 2000, seed: int = 0) -> str:
    """Deterministic pseudo-English: sentences of random words, punctuation and line breaks."""
    rng = random.Random(seed)
    sentences, count = [], 0
    while count < n_words:
        length = rng.randint(4, 14)
        words = [rng.choice(_WORDS) for _ in range(length)]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?", ";"]))
        count += length
    lines = [" ".join(sentences[i : i + 3]) for i in range(0, len(sentences), 3)]
    return "\n".join(lines) + "\n"


def _save_tokenizer(out_dir: Path) -> int:
    """Train a byte-level BPE (vocab 300) on sample text; save it for AutoTokenizer; return its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(sample_text(1500, seed=1).splitlines(), trainer)
    special = "<|endoftext|>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=special, eos_token=special,
                                   unk_token=special, pad_token=special)
    fast.save_pretrained(out_dir)
    return tokenizer.get_vocab_size()


def _save_random_model(out_dir, config_cls, model_cls, **architecture) -> Path:
    """A tiny randomly initialised model (by default hidden 64, 2 layers, 4 heads) with the tiny tokenizer."""
    out_dir = Path(out_dir)
    defaults = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
        # At the default std 0.02 the output is nearly independent of the weights; a larger std
        # makes it depend visibly on every layer, as a trained model's does.
        initializer_range=0.2,
    )
    config = config_cls(vocab_size=_save_tokenizer(out_dir), **{**defaults, **architecture})
    torch.manual_seed(0)
    model_cls(config).save_pretrained(out_dir)
    return out_dir


def make_tiny_llama(out_dir, **architecture) -> Path:
    """Llama with grouped-query attention (4 heads, 2 KV heads) and tied embeddings; keyword
    arguments override the architecture (e.g. num_hidden_layers, hidden_size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _save_random_model(
        out_dir, LlamaConfig, LlamaForCausalLM,
        **{"num_key_value_heads": 2, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0, **architecture},
    )


def make_tiny_bert(out_dir) -> Path:
    """BERT encoder (with pooler) using the same tiny tokenizer."""
    from transformers import BertConfig, BertModel

    return _save_random_model(out_dir, BertConfig, BertModel)


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order (what a byte-level BPE vocab uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_in, extra = {}, 0
    for b in range(256):
        if b in printable:
            stand_in[b] = chr(b)
        else:
            stand_in[b] = chr(256 + extra)
            extra += 1
    return [stand_in[b] for b in range(256)]


def make_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A tiny random llama GGUF (float32 tensors, byte-level BPE tokenizer) as llama.cpp lays it out."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    d, ff, n_layers, heads, kv_heads = 64, 128, 2, 4, 2
    tokens = _byte_level_alphabet() + ["he", "ll", "Ġw", "<|endoftext|>"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(d)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(d // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(["h e", "l l", "Ġ w"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)

    def tensor(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    head_dim = d // heads
    writer.add_tensor("token_embd.weight", tensor(len(tokens), d))
    writer.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for i in range(n_layers):
        for name, shape in [("attn_q", (d, d)), ("attn_k", (kv_heads * head_dim, d)), ("attn_v", (kv_heads * head_dim, d)),
                            ("attn_output", (d, d)), ("ffn_gate", (ff, d)), ("ffn_up", (ff, d)), ("ffn_down", (d, ff))]:
            writer.add_tensor(f"blk.{i}.{name}.weight", tensor(*shape))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    what, path = sys.argv[1], sys.argv[2]
    if what == "llama":
        make_tiny_llama(path)
    elif what == "bert":
        make_tiny_bert(path)
    elif what == "text":
        n_words = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
        Path(path).write_text(sample_text(n_words))
    else:
        sys.exit(f"unknown target {what!r}: use llama, bert or text")


def make_tiny_gguf_dir(path) -> Path:
    """A directory holding one tiny llama GGUF (float32 tensors, q/k rows permuted as llama.cpp does)."""
    return make_tiny_gguf(Path(path) / "tiny.gguf").parent
