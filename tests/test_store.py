import json

import pytest
import torch

from sopq.quantize import quantize_layer
from sopq.store import PackedFormatError, load_quantized, read_packed, save_quantized, write_packed


@pytest.fixture
def layers():
    g = torch.Generator().manual_seed(0)
    H = torch.eye(40, dtype=torch.float64)
    return {
        "block.0.q": quantize_layer(torch.randn(8, 40, generator=g), H, 5, 32, "fp16"),
        "block.0.up": quantize_layer(torch.randn(12, 40, generator=g), H, 8, 16, "e8m0"),
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for field in ("codes", "codebook", "scales"):
            assert torch.equal(getattr(a[name], field), getattr(b[name], field)), (name, field)
        assert (a[name].bits, a[name].group, a[name].scale_format) == (b[name].bits, b[name].group, b[name].scale_format)


def test_codebooks_file_roundtrip(tmp_path, layers):
    save_quantized(layers, tmp_path / "codebooks.safetensors")
    assert_same(layers, load_quantized(tmp_path / "codebooks.safetensors"))


def test_packed_roundtrip_and_manifest(tmp_path, layers):
    write_packed(layers, tmp_path / "packed", "fam")
    manifest = json.loads((tmp_path / "packed" / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["family"] == "fam"
    assert manifest["layers"]["block.0.up"] == {"bits": 8, "group": 16, "scale_format": "e8m0", "shape": [12, 40]}
    assert_same(layers, read_packed(tmp_path / "packed"))
    # No temporary folder left next to the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]


def test_packed_is_byte_identical_across_runs(tmp_path, layers):
    write_packed(layers, tmp_path / "a", "fam")
    write_packed(layers, tmp_path / "b", "fam")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_tampered_or_truncated_packed_file_is_refused(tmp_path, layers):
    write_packed(layers, tmp_path / "packed", "fam")
    weights = tmp_path / "packed" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PackedFormatError, match="sha256 mismatch"):
        read_packed(tmp_path / "packed")
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(PackedFormatError, match="sha256 mismatch"):
        read_packed(tmp_path / "packed")


def test_wrong_version_is_refused(tmp_path, layers):
    write_packed(layers, tmp_path / "packed", "fam")
    manifest_path = tmp_path / "packed" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(PackedFormatError, match="format version 1"):
        read_packed(tmp_path / "packed")
