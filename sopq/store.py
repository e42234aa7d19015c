"""On-disk forms of a quantized model: the fit stage's codebooks file and the packed directory.

Packed directory (format version sopq.packing.PACK_FORMAT_VERSION; the full spec is
docs/packed-format.md):
- `model.safetensors`: per layer `{layer}.codes` (int32 bit-plane words, sopq.packing layout),
  `{layer}.codebook` (float16, 2^bits entries), `{layer}.scales` (N x G, stored scale dtype)
- `manifest.json`: format version, family, per-layer bits/group/scale_format/shape, the sha256
  of model.safetensors (checked on every read) and the model source it was quantized from.
Every read validates the manifest (MANIFEST_SCHEMA) and each tensor's dtype and shape, so any
damaged or foreign directory raises PackedFormatError, never another exception.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import jsonschema
import torch
from safetensors import SafetensorError, safe_open

from sopq.formats import SCALE_BITS, num_groups
from sopq.io import atomic_path, safetensors_stream, sha256_file
from sopq.model import KINDS
from sopq.packing import MAX_BITS, MIN_BITS, PACK_FORMAT_VERSION, pack_codes, packed_words, unpack_codes
from sopq.quantize import QuantizedLayer

# Storage dtype of the scales, by scale format (E8M0: biased exponent bytes).
SCALE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "e8m0": torch.uint8}

# Dimensions and group sizes stay within int32, as the kernel and any other reader index them.
_POSITIVE_INT = {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}
MANIFEST_SCHEMA = {
    "type": "object",
    "required": ["format", "format_version", "family", "sha256", "layers"],
    "properties": {
        "format": {"const": "sopq-packed"},
        "format_version": {"const": PACK_FORMAT_VERSION},
        "family": {"type": "string"},
        "sha256": {
            "type": "object",
            "required": ["model.safetensors"],
            "properties": {"model.safetensors": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
        },
        "layers": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["bits", "group", "scale_format", "shape"],
                "properties": {
                    "bits": {"type": "integer", "minimum": MIN_BITS, "maximum": MAX_BITS},
                    "group": _POSITIVE_INT,
                    "scale_format": {"enum": sorted(SCALE_BITS)},
                    "shape": {"type": "array", "items": _POSITIVE_INT, "minItems": 2, "maxItems": 2},
                },
            },
        },
        # Optional: where the model architecture and the unquantized tensors come from.
        "source": {
            "type": "object",
            "required": ["model", "kind"],
            "properties": {
                "model": {"type": "string"},
                "kind": {"enum": list(KINDS)},
                "trust_remote_code": {"type": "boolean"},
            },
        },
    },
}

# JSON Schema counts 6.0 as an integer; bits, groups and shapes must be JSON integers proper.
_ManifestValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    ),
)


class PackedFormatError(ValueError):
    """A packed directory that is missing, truncated, tampered with or of another version."""


def _layer_meta(q: QuantizedLayer) -> dict:
    n, k = q.codes.shape
    return {"bits": q.bits, "group": q.group, "scale_format": q.scale_format, "shape": [n, k]}


class LazyLayers(Mapping):
    """{layer: QuantizedLayer}, each layer read by load(name) when asked for: fit and pack go
    through the model one layer at a time instead of holding every layer's codes."""

    def __init__(self, names, load):
        self._names = list(names)
        self._load = load

    def __getitem__(self, name: str) -> QuantizedLayer:
        if name not in self._names:
            raise KeyError(name)
        return self._load(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def save_quantized(layers: Mapping[str, QuantizedLayer], path) -> None:
    """The fit stage's output: unpacked codes (uint8), codebooks and stored scales per layer,
    written one layer at a time."""
    meta, metadata = {}, {}
    with safetensors_stream(path, metadata) as add:
        for name, q in layers.items():
            add(f"{name}.codes", q.codes)
            add(f"{name}.codebook", q.codebook)
            add(f"{name}.scales", q.scales)
            meta[name] = _layer_meta(q)
        metadata["layers"] = json.dumps(meta)


def load_quantized(path) -> LazyLayers:
    """save_quantized's layers, each read from the file when asked for."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["layers"])

    def load(name: str) -> QuantizedLayer:
        m = meta[name]
        with safe_open(str(path), framework="pt") as f:
            return QuantizedLayer(codebook=f.get_tensor(f"{name}.codebook"), scales=f.get_tensor(f"{name}.scales"),
                                  codes=f.get_tensor(f"{name}.codes"), bits=m["bits"], group=m["group"],
                                  scale_format=m["scale_format"])

    return LazyLayers(meta, load)


def write_packed(layers: Mapping[str, QuantizedLayer], out_dir, family: str, source: dict | None = None) -> None:
    """Write the packed directory, one layer at a time. `source`: {model: the model directory,
    kind, trust_remote_code}, recorded with the model path relative to `out_dir` so the pair can
    move together."""
    if source is not None:
        source = {**source, "model": os.path.relpath(source["model"], out_dir)}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        meta = {}
        with safetensors_stream(tmp / "model.safetensors") as add:
            for name, q in layers.items():
                add(f"{name}.codes", pack_codes(q.codes, q.bits))
                add(f"{name}.codebook", q.codebook)
                add(f"{name}.scales", q.scales)
                meta[name] = _layer_meta(q)
        manifest = {
            "format": "sopq-packed",
            "format_version": PACK_FORMAT_VERSION,
            "family": family,
            "sha256": {"model.safetensors": sha256_file(tmp / "model.safetensors")},
            "layers": meta,
            **({"source": source} if source is not None else {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))


def read_manifest(packed_dir) -> dict:
    path = Path(packed_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise PackedFormatError(f"{path}: cannot read the manifest ({exc}); rerun the pack stage") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "sopq-packed" or manifest.get("format_version") != PACK_FORMAT_VERSION:
        raise PackedFormatError(
            f"{path}: not a sopq packed directory of format version {PACK_FORMAT_VERSION}; rerun the pack stage"
        )
    error = jsonschema.exceptions.best_match(_ManifestValidator(MANIFEST_SCHEMA).iter_errors(manifest))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise PackedFormatError(f"{path}: invalid manifest at {where}: {error.message}; rerun the pack stage")
    return manifest


def _check_layer_tensors(name: str, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Each tensor's dtype and shape as the manifest implies, so decoding cannot fail later."""
    n, k = meta["shape"]
    expected = {
        "codes": (torch.int32, (packed_words(n, k, meta["bits"]),)),
        "codebook": (torch.float16, (2 ** meta["bits"],)),
        "scales": (SCALE_DTYPES[meta["scale_format"]], (n, num_groups(k, meta["group"]))),
    }
    for part, (dtype, shape) in expected.items():
        t = tensors[part]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise PackedFormatError(
                f"layer {name}: {part} is {t.dtype} {tuple(t.shape)}, the manifest implies {dtype} {shape}; "
                "rerun the pack stage"
            )


class PackedReader:
    """A packed directory whose manifest and sha256 are checked once, its layers read one at a
    time (the evaluate stage holds one block's, not the whole model's)."""

    def __init__(self, packed_dir):
        self.manifest = read_manifest(packed_dir)
        self.path = Path(packed_dir) / "model.safetensors"
        expected = self.manifest["sha256"]["model.safetensors"]
        if not self.path.is_file() or sha256_file(self.path) != expected:
            raise PackedFormatError(f"{self.path}: missing or sha256 mismatch with the manifest; rerun the pack stage")

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """{codes (packed words), codebook, scales} of one layer the manifest lists."""
        meta = self.manifest["layers"][name]
        try:
            with safe_open(str(self.path), framework="pt") as f:
                keys = {part: f"{name}.{part}" for part in ("codes", "codebook", "scales")}
                missing = sorted(set(keys.values()) - set(f.keys()))
                if missing:
                    raise PackedFormatError(f"{self.path}: no tensor {missing[0]} for a layer the manifest lists")
                tensors = {part: f.get_tensor(key) for part, key in keys.items()}
        except (SafetensorError, OSError) as exc:
            raise PackedFormatError(f"{self.path}: not a readable safetensors file ({exc}); rerun the pack stage") from None
        _check_layer_tensors(name, meta, tensors)
        return tensors

    def layer(self, name: str) -> QuantizedLayer:
        """One layer with its codes unpacked back to uint8."""
        return unpacked_layer(self.manifest["layers"][name], self.tensors(name))


def read_packed_tensors(packed_dir) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(manifest, {layer: {codes (packed words), codebook, scales}}) after checking the sha256."""
    reader = PackedReader(packed_dir)
    return reader.manifest, {name: reader.tensors(name) for name in reader.manifest["layers"]}


def unpacked_layer(meta: dict, tensors: dict[str, torch.Tensor]) -> QuantizedLayer:
    """One packed layer (manifest entry, {codes (packed words), codebook, scales}) with its codes unpacked."""
    return QuantizedLayer(
        codebook=tensors["codebook"],
        scales=tensors["scales"],
        codes=unpack_codes(tensors["codes"], meta["bits"], tuple(meta["shape"])),
        bits=meta["bits"],
        group=meta["group"],
        scale_format=meta["scale_format"],
    )


def read_packed(packed_dir) -> dict[str, QuantizedLayer]:
    """Every packed layer, codes unpacked back to uint8."""
    reader = PackedReader(packed_dir)
    return {name: reader.layer(name) for name in reader.manifest["layers"]}
