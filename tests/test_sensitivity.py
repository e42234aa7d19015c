import pandas as pd
import pytest
import torch

from sopq.formats import sop_bpw
from sopq.sensitivity import GramLookup, fit_layers, resolve_group, score_layers


def layers():
    g = torch.Generator().manual_seed(0)
    return {"a.q": torch.randn(32, 64, generator=g), "a.k": torch.randn(16, 64, generator=g),
            "a.o": torch.randn(64, 48, generator=g)}


def grams(loads):
    g = torch.Generator().manual_seed(1)
    X = {"a.q": torch.randn(256, 64, generator=g), "a.o": torch.randn(256, 48, generator=g)}
    stats = pd.DataFrame({"layer": ["a.q", "a.k", "a.o"], "gram_key": ["a.q", "a.q", "a.o"]})

    def load(key):
        loads.append(key)
        return X[key].T @ X[key] / 256

    return GramLookup(stats, load)


def test_gram_lookup_loads_a_shared_gram_once():
    loads = []
    lookup = grams(loads)
    assert torch.equal(lookup["a.q"], lookup["a.k"])
    lookup["a.o"]
    assert loads == ["a.q", "a.o"]


def test_resolve_group():
    assert resolve_group("row", 576) == 576
    assert resolve_group(32, 576) == 32
    assert resolve_group(128, 48) == 48


def test_score_layers_table_and_worker_processes_agree():
    table = score_layers(layers(), grams([]), [4, 6], 32, "fp16", True)
    assert list(table.columns) == ["layer", "bits", "group", "scale_format", "n", "k", "bpw", "e_out", "mse", "acos"]
    assert table[["layer", "bits"]].values.tolist() == [["a.q", 4], ["a.q", 6], ["a.k", 4], ["a.k", 6], ["a.o", 4], ["a.o", 6]]
    assert table.loc[0, "bpw"] == pytest.approx(sop_bpw(4, 32, "fp16", 32, 64))
    parallel = score_layers(layers(), grams([]), [4, 6], 32, "fp16", True, workers=2)
    pd.testing.assert_frame_equal(table, parallel)


def test_fit_layers_same_codes_with_workers():
    formats = {"a.q": (5, 32, "e8m0"), "a.o": (6, 16, "bf16")}
    serial = fit_layers(layers(), grams([]), formats, True)
    parallel = fit_layers(layers(), grams([]), formats, True, workers=2)
    for name in formats:
        assert torch.equal(serial[name].codes, parallel[name].codes)
        assert torch.equal(serial[name].scales, parallel[name].scales)
    assert serial["a.o"].scales.dtype == torch.bfloat16 and serial["a.o"].group == 16


def test_gram_lookup_from_calibration_files(tmp_path):
    from sopq.io import save_safetensors, write_parquet

    H = torch.eye(3) * 2
    write_parquet(pd.DataFrame({"layer": ["x.q", "x.k"], "gram_key": ["x.q", "x.q"], "channel": [0, 0]}), tmp_path / "s.parquet")
    save_safetensors({"x.q": H}, tmp_path / "g.safetensors")
    lookup = GramLookup.from_files(tmp_path / "s.parquet", tmp_path / "g.safetensors")
    assert torch.equal(lookup["x.k"], H.double())
