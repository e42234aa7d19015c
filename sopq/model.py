"""Model loading, generic discovery of quantizable layers, and token sequences for calibration/eval."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers.pytorch_utils import Conv1D

from sopq.fetch import model_files

KINDS = ("causal_lm", "encoder")


def load_model(model_dir, kind: str, *, trust_remote_code: bool = False):
    """Load (model, tokenizer) from an HF directory or a directory holding exactly one GGUF file.

    The model is float32 and in eval mode; GGUF weights are dequantized by transformers.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}: use one of {KINDS}")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model directory {model_dir} does not exist: run the fetch stage or fix the path")
    _, gguf_file = model_files(model_dir)
    extra = {"gguf_file": gguf_file} if gguf_file else {}

    auto = AutoModelForCausalLM if kind == "causal_lm" else AutoModel
    try:
        model = auto.from_pretrained(
            model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, SafetensorError, EOFError) as exc:
        raise ValueError(
            f"cannot load the model in {model_dir} ({exc}): a weights file is missing, truncated or "
            f"corrupt; delete {model_dir} and rerun the fetch stage"
        ) from None
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    model.eval().requires_grad_(False)
    # Parameters only: some models keep -inf attention-mask buffers on purpose.
    for name, tensor in model.named_parameters():
        if not torch.isfinite(tensor).all():
            raise ValueError(
                f"{model_dir}: {name} has NaN or Inf entries; the checkpoint is damaged: fix or re-fetch it"
            )
    return model, tokenizer


def convert_gguf(model_dir, kind: str, *, trust_remote_code: bool = False) -> None:
    """Turn a directory holding one GGUF file into an HF directory (config, fp32 safetensors, tokenizer).

    transformers dequantizes GGUF (and rebuilds its tokenizer) on every load, tens of seconds for
    a 0.5B model; the pipeline loads each model five times. The dequantized weights are exactly
    what every load would produce. The GGUF itself moves to `gguf/` for provenance.
    """
    model_dir = Path(model_dir)
    model, tokenizer = load_model(model_dir, kind, trust_remote_code=trust_remote_code)
    _, gguf_file = model_files(model_dir)
    (model_dir / "gguf").mkdir()
    (model_dir / gguf_file).rename(model_dir / "gguf" / gguf_file)
    # The weights are plain float32 now; without this transformers refuses to save a "GGUF-quantized" model.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def load_tokenizer(model_dir, *, trust_remote_code: bool = False):
    """The tokenizer of an HF directory or of a directory holding exactly one GGUF file."""
    from transformers import AutoTokenizer

    _, gguf_file = model_files(model_dir)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code, **extra)


def quantizable_layers(model: nn.Module, include: list[str], exclude: list[str]) -> dict[str, nn.Module]:
    """Every nn.Linear / GPT-2 Conv1D whose qualified name matches an include regex and no exclude regex.

    Returned in module order. A weight shared with another module (lm_head tied to the token
    embedding) is skipped: writing a quantized weight into it would silently change the other
    module too. A weight shared by several selected layers is returned once, under its first name.
    """
    include_res = [re.compile(p) for p in include]
    exclude_res = [re.compile(p) for p in exclude]
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)

    layers: dict[str, nn.Module] = {}
    seen_weights: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        if not any(r.search(name) for r in include_res) or any(r.search(name) for r in exclude_res):
            continue
        weight_id = id(module.weight)
        if weight_id in seen_weights:
            continue
        if any(not isinstance(m, (nn.Linear, Conv1D)) for m in owners[weight_id]):
            continue
        seen_weights.add(weight_id)
        layers[name] = module
    return layers


def get_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (N outputs, K inputs); a view, not a copy."""
    if isinstance(module, Conv1D):
        return module.weight.T  # Conv1D stores (K, N)
    if isinstance(module, nn.Linear):
        return module.weight
    raise ValueError(f"unsupported layer type {type(module).__name__}: expected nn.Linear or Conv1D")


def set_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Copy W (N, K) into the layer in place, keeping the layer's own dtype and storage layout."""
    target = get_weight(module)
    if tuple(W.shape) != tuple(target.shape):
        raise ValueError(f"weight shape {tuple(W.shape)} does not match the layer's {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(W)


def token_sequences(tokenizer, text: str, n_seq: int, seq_len: int) -> torch.Tensor:
    """n_seq contiguous, non-overlapping chunks of seq_len tokens, spread evenly over the text."""
    if n_seq < 1 or seq_len < 1:
        raise ValueError(f"n_seq and seq_len must be positive, got n_seq={n_seq}, seq_len={seq_len}")
    # The text is tokenized whole, so its length routinely exceeds model_max_length; chunks do not.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n_chunks = len(ids) // seq_len
    if n_chunks < n_seq:
        raise ValueError(
            f"text has {len(ids)} tokens but {n_seq} sequences x {seq_len} tokens = {n_seq * seq_len} "
            "are needed: use a longer text or fewer/shorter sequences"
        )
    starts = [(i * n_chunks // n_seq) * seq_len for i in range(n_seq)]
    return torch.tensor([ids[s : s + seq_len] for s in starts], dtype=torch.long)


def run_model(model: nn.Module, input_ids: torch.Tensor):
    """One forward pass on full-length sequences (attention mask of ones, no KV cache)."""
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and input_ids.shape[1] > max_positions:
        raise ValueError(
            f"sequences of {input_ids.shape[1]} tokens exceed the model's {max_positions} positions: "
            "lower seq_len in the config"
        )
    kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return model(**kwargs)
