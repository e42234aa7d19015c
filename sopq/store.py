"""On-disk forms of a quantized model: the fit stage's codebooks file and the packed directory.

Packed directory (format version sopq.packing.PACK_FORMAT_VERSION):
- `model.safetensors`: per layer `{layer}.codes` (int32 dense bitstream, sopq.packing layout),
  `{layer}.codebook` (float16, 2^bits entries), `{layer}.scales` (N x G, stored scale dtype)
- `manifest.json`: format version, family, per-layer bits/group/scale_format/shape, and the
  sha256 of model.safetensors, checked on every read.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sopq.io import atomic_path, save_safetensors, sha256_file
from sopq.packing import PACK_FORMAT_VERSION, pack_codes, unpack_codes
from sopq.quantize import QuantizedLayer


class PackedFormatError(ValueError):
    """A packed directory that is missing, truncated, tampered with or of another version."""


def _layer_meta(q: QuantizedLayer) -> dict:
    n, k = q.codes.shape
    return {"bits": q.bits, "group": q.group, "scale_format": q.scale_format, "shape": [n, k]}


def save_quantized(layers: dict[str, QuantizedLayer], path) -> None:
    """The fit stage's output: unpacked codes (uint8), codebooks and stored scales per layer."""
    tensors = {}
    for name, q in layers.items():
        tensors.update({f"{name}.codes": q.codes, f"{name}.codebook": q.codebook, f"{name}.scales": q.scales})
    meta = {name: _layer_meta(q) for name, q in layers.items()}
    save_safetensors(tensors, path, metadata={"layers": json.dumps(meta)})


def load_quantized(path) -> dict[str, QuantizedLayer]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["layers"])
        return {
            name: QuantizedLayer(
                codebook=f.get_tensor(f"{name}.codebook"),
                scales=f.get_tensor(f"{name}.scales"),
                codes=f.get_tensor(f"{name}.codes"),
                bits=m["bits"],
                group=m["group"],
                scale_format=m["scale_format"],
            )
            for name, m in meta.items()
        }


def write_packed(layers: dict[str, QuantizedLayer], out_dir, family: str) -> None:
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        tensors = {}
        for name, q in layers.items():
            tensors[f"{name}.codes"] = pack_codes(q.codes, q.bits)
            tensors[f"{name}.codebook"] = q.codebook.contiguous()
            tensors[f"{name}.scales"] = q.scales.contiguous()
        save_file(tensors, str(tmp / "model.safetensors"))
        manifest = {
            "format": "sopq-packed",
            "format_version": PACK_FORMAT_VERSION,
            "family": family,
            "sha256": {"model.safetensors": sha256_file(tmp / "model.safetensors")},
            "layers": {name: _layer_meta(q) for name, q in layers.items()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))


def read_manifest(packed_dir) -> dict:
    path = Path(packed_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PackedFormatError(f"{path}: cannot read the manifest ({exc}); rerun the pack stage") from None
    if manifest.get("format") != "sopq-packed" or manifest.get("format_version") != PACK_FORMAT_VERSION:
        raise PackedFormatError(
            f"{path}: not a sopq packed directory of format version {PACK_FORMAT_VERSION}; rerun the pack stage"
        )
    return manifest


def read_packed_tensors(packed_dir) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(manifest, {layer: {codes (packed words), codebook, scales}}) after checking the sha256."""
    manifest = read_manifest(packed_dir)
    weights = Path(packed_dir) / "model.safetensors"
    expected = manifest["sha256"]["model.safetensors"]
    if not weights.exists() or sha256_file(weights) != expected:
        raise PackedFormatError(f"{weights}: missing or sha256 mismatch with the manifest; rerun the pack stage")
    with safe_open(str(weights), framework="pt") as f:
        tensors = {
            name: {part: f.get_tensor(f"{name}.{part}") for part in ("codes", "codebook", "scales")}
            for name in manifest["layers"]
        }
    return manifest, tensors


def read_packed(packed_dir) -> dict[str, QuantizedLayer]:
    """Every packed layer, codes unpacked back to uint8."""
    manifest, tensors = read_packed_tensors(packed_dir)
    return {
        name: QuantizedLayer(
            codebook=t["codebook"],
            scales=t["scales"],
            codes=unpack_codes(t["codes"], meta["bits"], tuple(meta["shape"])),
            bits=meta["bits"],
            group=meta["group"],
            scale_format=meta["scale_format"],
        )
        for (name, t), meta in zip(tensors.items(), manifest["layers"].values())
    }
