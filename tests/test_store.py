import contextlib
import json
import signal

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sopq.io import sha256_file
from sopq.packing import packed_words
from sopq.quantize import quantize_layer
from sopq.store import LazyLayers, PackedFormatError, load_quantized, read_packed, save_quantized, write_packed


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


def test_fit_and_pack_hold_one_layer_at_a_time(tmp_path):
    """Layers read on demand are written and dropped one by one: when a layer is read, at most
    the one before it is still alive (the loop's variable), never all of them. Fit reads the
    sensitivity fits this way, pack the codebooks file."""
    import gc
    import weakref

    g = torch.Generator().manual_seed(1)
    H = torch.eye(40, dtype=torch.float64)
    layers = {f"block.{i}.q": quantize_layer(torch.randn(8, 40, generator=g), H, 4 + i, 32, "fp16") for i in range(5)}
    alive_at_read, read = [], []

    def load(name):
        gc.collect()
        alive_at_read.append(sum(ref() is not None for ref in read))
        q = layers[name]
        copy = type(q)(codes=q.codes.clone(), codebook=q.codebook.clone(), scales=q.scales.clone(),
                       bits=q.bits, group=q.group, scale_format=q.scale_format)
        read.append(weakref.ref(copy))
        return copy

    save_quantized(LazyLayers(layers, load), tmp_path / "codebooks.safetensors")
    write_packed(LazyLayers(layers, load), tmp_path / "packed", "fam")
    assert len(read) == 2 * len(layers) and max(alive_at_read) == 1  # each layer read once per file
    assert_same(layers, load_quantized(tmp_path / "codebooks.safetensors"))
    assert_same(layers, read_packed(tmp_path / "packed"))


def test_packed_roundtrip_and_manifest(tmp_path, layers):
    write_packed(layers, tmp_path / "packed", "fam")
    manifest = json.loads((tmp_path / "packed" / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["family"] == "fam"
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
    with pytest.raises(PackedFormatError, match="format version 2"):
        read_packed(tmp_path / "packed")


def test_manifest_schema_violations_name_the_field(tmp_path, layers):
    write_packed(layers, tmp_path / "packed", "fam")
    manifest_path = tmp_path / "packed" / "manifest.json"
    good = json.loads(manifest_path.read_text())
    for change, message in [
        (lambda m: m["layers"]["block.0.q"].update(bits=6.0), r"layers.block.0.q.bits: 6.0 is not of type 'integer'"),
        (lambda m: m["layers"]["block.0.q"].update(bits=3), r"layers.block.0.q.bits: 3 is less than the minimum of 4"),
        (lambda m: m["layers"]["block.0.up"].update(scale_format="fp32"), r"layers.block.0.up.scale_format: 'fp32' is not one of"),
        (lambda m: m["layers"]["block.0.up"].update(shape=[12]), r"layers.block.0.up.shape: \[12\] is too short"),
        (lambda m: m["sha256"].update({"model.safetensors": "abc"}), r"sha256.model.safetensors: 'abc' does not match"),
        (lambda m: m.pop("layers"), r"\(top level\): 'layers' is a required property"),
    ]:
        bad = json.loads(json.dumps(good))
        change(bad)
        manifest_path.write_text(json.dumps(bad))
        with pytest.raises(PackedFormatError, match="invalid manifest at " + message):
            read_packed(tmp_path / "packed")


def resign(packed_dir):
    """Record the current model.safetensors sha256 in the manifest, as a careless tool might."""
    manifest_path = packed_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sha256"]["model.safetensors"] = sha256_file(packed_dir / "model.safetensors")
    manifest_path.write_text(json.dumps(manifest))


def test_consistent_checksum_but_wrong_tensors_is_refused(tmp_path, layers):
    write_packed(layers, tmp_path / "packed", "fam")
    other = {"block.0.q": layers["block.0.up"], "block.0.up": layers["block.0.q"]}
    write_packed(other, tmp_path / "other", "fam")
    (tmp_path / "packed" / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    resign(tmp_path / "packed")
    found = packed_words(*layers["block.0.up"].codes.shape, layers["block.0.up"].bits)
    implied = packed_words(*layers["block.0.q"].codes.shape, layers["block.0.q"].bits)
    assert found != implied
    with pytest.raises(PackedFormatError, match=rf"layer block.0.q: codes is torch.int32 \({found},\), the manifest implies torch.int32 \({implied},\)"):
        read_packed(tmp_path / "packed")


# --- property test: whatever the bytes, the reader returns layers or raises PackedFormatError ---

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
_MANIFEST_PATHS = [(), ("format_version",), ("family",), ("sha256",), ("layers",), ("layers", "block.0.q"),
                   ("layers", "block.0.q", "bits"), ("layers", "block.0.q", "group"), ("layers", "block.0.up", "shape"),
                   ("layers", "block.0.up", "scale_format"), ("layers", "block.0.q", "shape", 1), ("source",)]


def _mutate_bytes(data: bytes, draw) -> bytes:
    op = draw(st.sampled_from(["random", "flip", "truncate", "insert"]))
    if op == "random":
        return draw(st.binary(max_size=2 * len(data)))
    at = draw(st.integers(0, len(data)))
    if op == "truncate":
        return data[:at]
    if op == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    flips = draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)), min_size=1, max_size=8))
    out = bytearray(data)
    for i, x in flips:
        out[i] ^= x
    return bytes(out)


@contextlib.contextmanager
def time_limit(seconds: float):
    def hang(signum, frame):
        raise TimeoutError(f"the reader took more than {seconds} s: treated as a hang")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def valid_packed(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    H = torch.eye(40, dtype=torch.float64)
    layers = {"block.0.q": quantize_layer(torch.randn(8, 40, generator=g), H, 5, 32, "fp16"),
              "block.0.up": quantize_layer(torch.randn(12, 40, generator=g), H, 8, 16, "e8m0")}
    packed_dir = tmp_path_factory.mktemp("valid") / "packed"
    write_packed(layers, packed_dir, "fam")
    return (packed_dir / "manifest.json").read_bytes(), (packed_dir / "model.safetensors").read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_reader_never_crashes_or_hangs_on_mutated_bytes(tmp_path, valid_packed, data):
    manifest_bytes, model_bytes = valid_packed
    target = data.draw(st.sampled_from(["manifest bytes", "manifest json", "model", "model resigned"]))
    if target == "manifest bytes":
        manifest_bytes = _mutate_bytes(manifest_bytes, data.draw)
    elif target == "manifest json":
        manifest = json.loads(manifest_bytes)
        *parents, last = data.draw(st.sampled_from(_MANIFEST_PATHS)) or (None,)
        node = manifest
        for key in parents:
            node = node[key]
        if last is None:
            manifest = data.draw(_json)
        else:
            node[last] = data.draw(_json)
        manifest_bytes = json.dumps(manifest).encode()
    else:
        model_bytes = _mutate_bytes(model_bytes, data.draw)
    packed_dir = tmp_path / "packed"
    packed_dir.mkdir(exist_ok=True)
    (packed_dir / "manifest.json").write_bytes(manifest_bytes)
    (packed_dir / "model.safetensors").write_bytes(model_bytes)
    if target == "model resigned":
        # Past the checksum, so the safetensors parser and the tensor checks see the damage.
        resign(packed_dir)
    with time_limit(20):
        try:
            layers = read_packed(packed_dir)
        except PackedFormatError:
            return
    for q in layers.values():
        assert q.dequantize().shape == q.codes.shape


def test_safetensors_stream_writes_what_safetensors_reads(tmp_path):
    from safetensors import safe_open

    from sopq.io import safetensors_stream

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int32), "c": torch.randn(2, 2).bfloat16(),
               "empty": torch.zeros(0, 4), "odd": torch.ones(3, dtype=torch.uint8)}
    with safetensors_stream(tmp_path / "x.safetensors", metadata={"k": "v"}) as add:
        for name, t in tensors.items():
            add(name, t)
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"k": "v"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t), name


def test_safetensors_stream_leaves_nothing_on_failure(tmp_path):
    from sopq.io import safetensors_stream

    with pytest.raises(ValueError, match="written twice"):
        with safetensors_stream(tmp_path / "x.safetensors") as add:
            add("a", torch.ones(2))
            add("a", torch.ones(2))
    assert list(tmp_path.iterdir()) == []
