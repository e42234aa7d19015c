"""Use a packed model: `sopq.load(packed_dir)` gives a transformers model whose quantized layers
compute from the packed codes, and `export_dequantized` writes a plain HF checkpoint.

A packed directory holds only the quantized layers. The architecture, the tokenizer and every
tensor that was not quantized (embeddings, norms, excluded layers) come from the model it was
quantized from: the manifest's `source.model` names that directory relative to the packed
directory (the pipeline's resources/models/{family}); `model_dir=` overrides it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sopq.formats import groups_major
from sopq.io import atomic_path
from sopq.model import get_weight, load_model, set_weight
from sopq.model import load_tokenizer as load_source_tokenizer
from sopq.store import SCALE_DTYPES, PackedFormatError, read_manifest, read_packed_tensors, unpacked_layer
from transformers.pytorch_utils import Conv1D


class PackedLinear(nn.Module):
    """y = x W_hat^T + b with W_hat held as packed codes, codebook and stored scales.

    On a GPU the Triton LUT matmul decodes the codes inside the matmul. Elsewhere (or with
    kernel=False) the torch fallback decodes W_hat with the same code as the evaluate stage
    (sopq.packing) on every call and runs F.linear, so its outputs equal that stage's.
    """

    def __init__(self, meta: dict, words, codebook, scales, bias=None, *, kernel: bool | None = None):
        """meta: the layer's manifest entry (bits, group, scale_format, shape)."""
        super().__init__()
        self.meta = meta
        self.out_features, self.in_features = meta["shape"]
        self.bits, self.group, self.scale_format = meta["bits"], meta["group"], meta["scale_format"]
        # None: the kernel on CUDA tensors, the fallback elsewhere.
        self.kernel = kernel
        self.register_buffer("words", words)
        # fp16/bf16 tensors are kept as their raw 16-bit patterns: model.half() or
        # .to(torch.bfloat16) would otherwise re-round the codebook and scales.
        self.register_buffer("codebook_bits", codebook.view(torch.int16))
        # Groups-major: the layout the kernel reads fastest.
        scales = groups_major(scales)
        self.register_buffer("scale_bits", scales.view(torch.int16) if scales.is_floating_point() else scales)
        self.register_buffer("bias", bias)

    @property
    def codebook(self) -> torch.Tensor:
        return self.codebook_bits.view(torch.float16)

    @property
    def scales(self) -> torch.Tensor:
        return self.scale_bits.view(SCALE_DTYPES[self.scale_format])

    def dequantize(self) -> torch.Tensor:
        """W_hat (N, K) in float32."""
        parts = {"codes": self.words.cpu(), "codebook": self.codebook.cpu(), "scales": self.scales.cpu()}
        return unpacked_layer(self.meta, parts).dequantize().to(self.words.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_kernel = x.is_cuda if self.kernel is None else self.kernel
        if not use_kernel:
            return nn.functional.linear(x, self.dequantize().to(x.dtype), self.bias)
        from kernels.lut_matmul import lut_matmul

        y = lut_matmul(
            x.reshape(-1, self.in_features), self.words, self.codebook, self.scales,
            bits=self.bits, group=self.group, n=self.out_features, k=self.in_features,
        ).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group={self.group}, scale_format={self.scale_format}, bias={self.bias is not None}")


def _source_model(manifest: dict, packed_dir: Path, model_dir) -> tuple[Path, dict]:
    """(model directory, the manifest's source record) of the model the packed directory was made
    from; model_dir, when given, overrides the recorded directory."""
    source = manifest.get("source") or {}
    if model_dir is None:
        if "model" not in source:
            raise PackedFormatError(
                f"{packed_dir}/manifest.json names no source model; pass model_dir= (the model it was quantized from)"
            )
        model_dir = packed_dir / source["model"]
        if not model_dir.is_dir():
            raise PackedFormatError(
                f"{packed_dir}: the source model {model_dir} it was quantized from is not there; "
                "pass model_dir= where it lives now"
            )
    return Path(model_dir), source


def _packed_layers(model: nn.Module, manifest: dict, packed_dir: Path):
    """(name, parent module, attribute, original layer) per packed layer, checked against the model."""
    for name, meta in manifest["layers"].items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise PackedFormatError(f"{packed_dir}: layer {name} is not in the model; was it packed from another model?") from None
        if not isinstance(layer, (nn.Linear, Conv1D)) or tuple(get_weight(layer).shape) != tuple(meta["shape"]):
            raise PackedFormatError(
                f"{packed_dir}: layer {name} does not match the model (packed shape {tuple(meta['shape'])}); "
                "was it packed from another model?"
            )
        parent_name, _, attribute = name.rpartition(".")
        yield name, model.get_submodule(parent_name), attribute, layer


def _open(packed_dir, model_dir, kind):
    packed_dir = Path(packed_dir)
    manifest, tensors = read_packed_tensors(packed_dir)
    model_dir, source = _source_model(manifest, packed_dir, model_dir)
    kind = kind or source.get("kind")
    if kind is None:
        raise PackedFormatError(f"{packed_dir}/manifest.json does not record the model kind; pass kind=")
    model, tokenizer = load_model(model_dir, kind, trust_remote_code=source.get("trust_remote_code", False))
    return packed_dir, manifest, tensors, model, tokenizer


def load(packed_dir, *, model_dir=None, kind=None, device=None, kernel: bool | None = None) -> nn.Module:
    """The model with every packed layer replaced by a PackedLinear; float32, eval mode.

    model_dir, kind: the source model and its kind ("causal_lm", "encoder"), by default those
    the manifest records. kernel: None uses the Triton kernel for CUDA inputs and the torch
    fallback otherwise. Raises PackedFormatError for a damaged, tampered or mismatched packed
    directory.
    """
    packed_dir, manifest, tensors, model, _ = _open(packed_dir, model_dir, kind)
    for name, parent, attribute, layer in list(_packed_layers(model, manifest, packed_dir)):
        t = tensors[name]
        bias = None if layer.bias is None else layer.bias.detach().clone()
        setattr(parent, attribute, PackedLinear(manifest["layers"][name], t["codes"], t["codebook"], t["scales"],
                                                bias, kernel=kernel))
    return model.to(device) if device is not None else model


def load_tokenizer(packed_dir, *, model_dir=None):
    """The tokenizer of the model the packed directory was made from."""
    packed_dir = Path(packed_dir)
    model_dir, source = _source_model(read_manifest(packed_dir), packed_dir, model_dir)
    return load_source_tokenizer(model_dir, trust_remote_code=source.get("trust_remote_code", False))


def export_dequantized(packed_dir, out_dir, *, model_dir=None, kind=None) -> None:
    """Write a plain HF checkpoint (config, float32 safetensors, tokenizer) whose quantized layers
    hold W_hat, for tools that cannot read the packed format. It is as large as float32."""
    packed_dir, manifest, tensors, model, tokenizer = _open(packed_dir, model_dir, kind)
    for name, _, _, layer in _packed_layers(model, manifest, packed_dir):
        set_weight(layer, unpacked_layer(manifest["layers"][name], tensors[name]).dequantize())
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
