import multiprocessing

import pandas as pd
import pytest
import torch

from sopq.formats import sop_bpw
from sopq.quantize import quantize_layer
from sopq.sensitivity import FitOption, _map_layers, GramLookup, load_fits, resolve_group, score_layers, search_options


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


def test_score_layers_table_and_worker_processes_agree(tmp_path):
    table = score_layers(layers(), grams([]), [4, 6], [FitOption(32, "fp16")], True, fits_dir=tmp_path / "serial")
    assert list(table.columns) == ["layer", "bits", "group", "scale_format", "mode", "n", "k", "bpw", "e_out", "mse", "acos"]
    assert table[["layer", "bits"]].values.tolist() == [["a.q", 4], ["a.q", 6], ["a.k", 4], ["a.k", 6], ["a.o", 4], ["a.o", 6]]
    assert table.loc[0, "bpw"] == pytest.approx(sop_bpw(4, 32, "fp16", 32, 64))
    assert sorted(p.name for p in (tmp_path / "serial").iterdir()) == ["a.k.safetensors", "a.o.safetensors", "a.q.safetensors"]
    parallel = score_layers(layers(), grams([]), [4, 6], [FitOption(32, "fp16")], True, workers=2, fits_dir=tmp_path / "parallel")
    pd.testing.assert_frame_equal(table, parallel)
    for layer in ("a.q", "a.k", "a.o"):
        wanted = {layer: "b6.g32.fp16.free"}
        assert torch.equal(load_fits(tmp_path / "serial", wanted)[layer].codes, load_fits(tmp_path / "parallel", wanted)[layer].codes)


# Set by a later task; inherited by the forked worker processes of _map_layers.
_LATER_TASK_RAN = multiprocessing.get_context("fork").Event()


def _blocks_until_a_later_task_runs(i):
    """Task 0 waits (bounded) for a task more than a window's length behind it to run."""
    if i == 0:
        return i, _LATER_TASK_RAN.wait(timeout=60)
    if i == 6:
        _LATER_TASK_RAN.set()
    return i, True


def test_map_layers_keeps_workers_busy_behind_a_slow_layer_and_yields_in_order():
    # Task 0 finishes only once task 6 has started: with 2 workers at most 4 tasks are queued or
    # running, so task 6 can run only if tasks behind a slow one are started as others finish.
    _LATER_TASK_RAN.clear()
    results = list(_map_layers(_blocks_until_a_later_task_runs, ((i,) for i in range(10)), 2, "test", 10))
    assert results == [(i, True) for i in range(10)]


def test_search_space_options_and_stored_fits_round_trip(tmp_path):
    quantization = {"group": 32, "scale_format": "fp16", "search": {"groups": [16, "row"], "modes": ["free", "fp8"]}}
    options = search_options(quantization)
    assert options == [FitOption(16, "fp16", "free"), FitOption(16, "fp16", "fp8"),
                       FitOption("row", "fp16", "free"), FitOption("row", "fp16", "fp8")]
    assert search_options({"group": "row", "scale_format": "e8m0"}) == [FitOption("row", "e8m0", "free")]
    table = score_layers(layers(), grams([]), [5], options, True, fits_dir=tmp_path / "fits")
    assert len(table) == 3 * 4
    assert set(table.loc[table.layer == "a.o", "group"]) == {16, 48}  # "row" resolves to K
    # fp8 mode: every decoded codebook entry is a finite E4M3 value.
    back = load_fits(tmp_path / "fits", {"a.o": "b5.g48.fp16.free", "a.q": "b5.g16.fp16.fp8"})
    fp8_book = back["a.q"].codebook.float()
    assert torch.equal(fp8_book.to(torch.float8_e4m3fn).float(), fp8_book)
    # What was stored is what a fit gives (fits are deterministic).
    fresh = quantize_layer(layers()["a.o"], grams([])["a.o"], 5, 48, "fp16")
    assert torch.equal(back["a.o"].dequantize(), fresh.dequantize())
    with pytest.raises(ValueError, match="no fit b6.g48.fp16.free of layer a.o"):
        load_fits(tmp_path / "fits", {"a.o": "b6.g48.fp16.free"})


def test_score_layers_same_fits_with_workers(tmp_path):
    wanted = {"a.q": "b5.g32.e8m0.free", "a.o": "b6.g16.bf16.fp8"}
    options = [FitOption(32, "e8m0", "free"), FitOption(16, "bf16", "fp8")]
    score_layers(layers(), grams([]), [5, 6], options, True, fits_dir=tmp_path / "serial")
    score_layers(layers(), grams([]), [5, 6], options, True, workers=2, fits_dir=tmp_path / "parallel")
    serial, parallel = load_fits(tmp_path / "serial", wanted), load_fits(tmp_path / "parallel", wanted)
    for name in wanted:
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
