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
from sopq.io import SAFETENSORS_DTYPES

KINDS = ("causal_lm", "encoder")


def _model_source(model_dir, kind: str):
    """(model directory, from_pretrained's extra arguments, the Auto class for the kind)."""
    from transformers import AutoModel, AutoModelForCausalLM

    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}: use one of {KINDS}")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model directory {model_dir} does not exist: run the fetch stage or fix the path")
    _, gguf_file = model_files(model_dir)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    return model_dir, extra, AutoModelForCausalLM if kind == "causal_lm" else AutoModel


def load_model(model_dir, kind: str, *, trust_remote_code: bool = False):
    """Load (model, tokenizer) from an HF directory or a directory holding exactly one GGUF file.

    The model is float32 and in eval mode; GGUF weights are dequantized by transformers.
    """
    model_dir, extra, auto = _model_source(model_dir, kind)
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


def load_empty_model(model_dir, kind: str, *, trust_remote_code: bool = False):
    """(model, tokenizer, weights) without reading a weight: parameters on the meta device.

    Buffers are real (rotary frequencies and the like are computed, not stored); `weights` is a
    LazyWeights that reads one tensor at a time from the directory's safetensors files or GGUF
    file, with the same names, values and dtype (float32) as `load_model` gives.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    model_dir, extra, auto = _model_source(model_dir, kind)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, **extra)
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    # from_pretrained ties the LM head to the embedding, from_config does not: tie here too, so
    # that layer discovery and the weight lookups see the model load_model gives.
    model.tie_weights()
    model.eval().requires_grad_(False)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    weights = GGUFWeights(model_dir / extra["gguf_file"], model) if extra else SafetensorsWeights(model_dir, model)
    return model, tokenizer, weights


class LazyWeights:
    """Tensors of one model by parameter name, each read from disk when asked for."""

    def tensor(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def parameter(self, name: str) -> torch.Tensor:
        """tensor(name) as float32, refused (as load_model refuses it) if it has NaN or Inf entries."""
        value = self.tensor(name).to(torch.float32)
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} has NaN or Inf entries; the checkpoint is damaged: fix or re-fetch it")
        return value

    def materialize(self, model: nn.Module, module: nn.Module, recurse: bool = True) -> None:
        """Read `module`'s parameters (a submodule of `model`) from disk into it, as float32."""
        prefix = _qualified_name(model, module)
        for name, param in list(module.named_parameters(recurse=recurse)):
            if not param.is_meta:
                continue
            owner, attr = _owner(module, name)
            value = self.parameter(f"{prefix}{name}")
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{prefix}{name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(param.shape)}")
            setattr(owner, attr, nn.Parameter(value, requires_grad=False))

    @staticmethod
    def release(module: nn.Module, recurse: bool = True) -> None:
        """Give `module`'s parameter memory back: they return to the meta device."""
        for name, param in list(module.named_parameters(recurse=recurse)):
            owner, attr = _owner(module, name)
            setattr(owner, attr, nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False))


def _owner(module: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    path, _, attr = dotted.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


def _qualified_name(model: nn.Module, module: nn.Module) -> str:
    if module is model:
        return ""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name + "."
    raise ValueError("module is not part of the model")


class SafetensorsWeights(LazyWeights):
    """An HF directory's *.safetensors files (sharded or not), each tensor read when asked for.

    Plain reads at the offsets the file's header gives, not a memory map: pages of a map that
    were read once would stay in the process's resident memory, which then grows with depth.
    Checkpoint keys may carry the base model prefix (`bert.encoder...`) where the model's names
    do not, or the other way round; both are accepted.
    """

    def __init__(self, model_dir: Path, model: nn.Module):
        import json
        import struct

        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise ValueError(f"{model_dir} has no .safetensors files: lazy loading needs safetensors (or GGUF)")
        self._where = {}  # key -> (file, data offset, dtype name, shape, length)
        for path in files:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            for key, info in header.items():
                if key != "__metadata__":
                    start, end = info["data_offsets"]
                    self._where[key] = (path, 8 + header_len + start, info["dtype"], info["shape"], end - start)
        self._prefix = getattr(model, "base_model_prefix", "")
        # A tied weight (lm_head to the embedding) is saved once, under the first name.
        self._tied = _tied_names(model)

    def tensor(self, name: str) -> torch.Tensor:
        p = self._prefix
        names = [name, self._tied[name]] if name in self._tied else [name]
        candidates = [c for n in names for c in ([n, f"{p}.{n}", n.removeprefix(f"{p}.")] if p else [n])]
        key = next((k for k in candidates if k in self._where), None)
        if key is None:
            raise ValueError(f"parameter {name} is not in the checkpoint (tried {candidates}): use calibration.streaming: false")
        path, offset, dtype, shape, length = self._where[key]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {key} has dtype {dtype}, which sopq cannot read")
        buffer = bytearray(length)
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(buffer) != length:
                raise ValueError(f"{path} is truncated (tensor {key}): fetch the model again")
        if not length:
            return torch.empty(shape, dtype=getattr(torch, SAFETENSORS_DTYPES[dtype]))
        return torch.frombuffer(buffer, dtype=getattr(torch, SAFETENSORS_DTYPES[dtype])).reshape(shape)


class GGUFWeights(LazyWeights):
    """One GGUF file, memory-mapped by gguf.GGUFReader; each tensor dequantized when asked for.

    Names and per-architecture fix-ups (Llama's q/k row permutation, Gemma's norm offset) come
    from transformers' own GGUF loader, so the values equal `load_model`'s.
    """

    def __init__(self, path: Path, model: nn.Module):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint)

        self._reader = reader = GGUFReader(str(path))
        architecture = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
        config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
        self._hf_name = get_gguf_hf_weights_map(model, self._processor)
        self._tensors = {t.name: t for t in reader.tensors}
        self._gguf_name = {hf: gguf for gguf, hf in self._hf_name.items()}
        # A weight the model ties to another (lm_head to the embedding) may have no tensor of its own.
        self._tied = _tied_names(model)

    def tensor(self, name: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        # The map may name a tensor the file lacks (a tied head's "output.weight"): then the tied one.
        candidates = (self._gguf_name.get(n) for n in (name, self._tied.get(name)))
        gguf_name = next((g for g in candidates if g in self._tensors), None)
        if gguf_name is None:
            raise ValueError(f"parameter {name} has no tensor in the GGUF file: use calibration.streaming: false")
        t = self._tensors[gguf_name]
        result = self._processor.process(weights=dequantize(t.data, t.tensor_type), name=gguf_name,
                                         tensor_key_mapping=self._hf_name, parsed_parameters={"tensors": {}})
        self._drop_pages(t)
        if result.name != gguf_name:
            raise ValueError(f"GGUF tensor {gguf_name} needs a merge across tensors (MoE): use calibration.streaming: false")
        return torch.from_numpy(np.copy(result.weights))

    def _drop_pages(self, t) -> None:
        """Pages of the memory map read for this tensor leave resident memory again (the file
        stays in the page cache): otherwise the process's memory grows with every block read."""
        import mmap

        mapped = getattr(self._reader.data, "_mmap", None)
        if mapped is None:
            return
        start = t.data_offset - t.data_offset % mmap.PAGESIZE
        mapped.madvise(mmap.MADV_DONTNEED, start, t.data_offset + t.n_bytes - start)


def _tied_names(model: nn.Module) -> dict[str, str]:
    """{name: first name} for every parameter that is the same tensor as an earlier one."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied_to = first.setdefault(id(param), name)
        if tied_to != name:
            tied[name] = tied_to
    return tied


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


def read_layer_weights(model_dir, kind: str, include: list[str], exclude: list[str], select=None, *,
                       trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """{layer: float32 (N, K) weight} of the quantizable layers that `select` picks (a function
    of the list of all of them, in module order; all if None), read from disk one tensor at a
    time: nothing else of the model is loaded. Same values as get_weight on load_model's model."""
    model, _, weights = load_empty_model(model_dir, kind, trust_remote_code=trust_remote_code)
    layers = quantizable_layers(model, include, exclude)
    names = list(layers) if select is None else select(list(layers))
    unknown = sorted(set(names) - set(layers))
    if unknown:
        raise ValueError(f"not quantizable layers of {model_dir}: {unknown}; rerun the stage that named them")
    out = {}
    for name in names:
        W = weights.parameter(f"{name}.weight")
        out[name] = W.T.contiguous() if isinstance(layers[name], Conv1D) else W
    return out


def layer_shard(names: list[str], shard: int, shards: int) -> list[str]:
    """Shard `shard` (0-based) of `shards` contiguous, near-equal slices of the layers in module
    order, so that a shard covers a range of blocks."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
    if shards > len(names):
        raise ValueError(f"shards: {shards} is more than the {len(names)} layers: lower the family's shards")
    return names[shard * len(names) // shards : (shard + 1) * len(names) // shards]


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
