import logging
import re
import runpy
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from sopq.config import config_hash
from sopq.report import build_report, compare_to_fp8, layer_wins, read_benchmarks

SCRIPT = Path(__file__).resolve().parents[1] / "workflow" / "scripts" / "report.py"
VARIANTS = ("reference", "sop6", "sop_promoted", "fp8_channel", "fp8_tensor")
NAN = float("nan")

LLM_LAYERS = [f"model.layers.{i}.{p}" for i in range(3) for p in ("self_attn.q_proj", "mlp.down_proj")]
ENC_LAYERS = [f"encoder.layer.{i}.{p}" for i in range(2) for p in ("attention.self.query", "output.dense")]

# llm: sop6 beats FP8 per channel on median E_out but loses on KL mean, and the reverse
# against FP8 per tensor. KL p99 of fp8_tensor is missing (NaN) on purpose.
LLM_EVAL = pd.DataFrame(
    {
        "variant": list(VARIANTS),
        "bpw": [NAN, 6.02, 6.4, 8.0, 8.0],
        "e_out_median": [0.0, 1e-3, 5e-4, 2e-3, 4e-4],
        "e_out_p95": [0.0, 2e-3, 9e-4, 3e-3, 8e-4],
        "e_out_max": [0.0, 3e-3, 1e-3, 4e-3, 9e-4],
        "ppl": [12.0, 12.3, 12.1, 12.2, 12.05],
        "kl_mean": [0.0, 0.02, 0.01, 0.01, 0.03],
        "kl_p99": [0.0, 0.2, 0.1, 0.1, NAN],
        "top1": [1.0, 0.95, 0.97, 0.96, 0.94],
    }
)
# encoder: causal-LM columns present but NaN; sop6 wins both metrics against FP8 per channel.
ENC_EVAL = pd.DataFrame(
    {
        "variant": list(VARIANTS),
        "bpw": [NAN, 6.03, 6.5, 8.0, 8.0],
        "e_out_median": [0.0, 1e-3, 6e-4, 2e-3, 3e-3],
        "e_out_p95": [0.0, 2e-3, 9e-4, 3e-3, 4e-3],
        "e_out_max": [0.0, 3e-3, 1e-3, 4e-3, 5e-3],
        "ppl": [NAN] * 5,
        "cosine_mean": [1.0, 0.9995, 0.9998, 0.999, 0.998],
        "cosine_min": [1.0, 0.99, 0.995, 0.98, 0.97],
    }
)


def write_family(root: Path, name: str, layers: list[str], evaluation: pd.DataFrame, device: str) -> dict:
    out = root / "results" / name
    out.mkdir(parents=True)
    n, k = 64, 128
    sensitivity = pd.DataFrame(
        [
            {"layer": layer, "bits": b, "group": 32, "scale_format": "fp16", "n": n, "k": k,
             "bpw": b + 16 / 32 + 16 * 2**b / (n * k), "e_out": 4.0**-b * (1 + i), "mse": 4.0**-b,
             "acos": 1 - 4.0**-b, "alpha": 10.0 ** (i % 3)}
            for i, layer in enumerate(layers)
            for b in (4, 5, 6, 7, 8)
        ]
    )
    bits = [7 if i % 3 == 2 else 5 if i == 0 else 6 for i in range(len(layers))]
    chosen = sensitivity.set_index(["layer", "bits"]).loc[list(zip(layers, bits))].reset_index()
    plan = chosen[["layer", "bits", "group", "scale_format", "n", "k", "bpw", "alpha"]].assign(
        e_out_pred=chosen["e_out"], budget_bpw=7.0
    )
    timed = device != "cpu-interpreter"
    kernel = pd.DataFrame(
        {"layer": layers, "bits": bits, "n": n, "k": k, "m": 16, "max_abs_err": 1e-3,
         "rel_err": [1e-4 * (i + 1) for i in range(len(layers))], "device": device,
         "kernel_us": 20.0 if timed else NAN, "torch_us": 50.0 if timed else NAN}
    )
    # per-layer E_out: SOP below FP8 per channel everywhere except the last layer for sop6
    e_layer = {"sop6": 1e-3, "sop_promoted": 5e-4, "fp8_channel": 2e-3, "fp8_tensor": 8e-4}
    eval_layers = pd.DataFrame(
        [
            {"variant": v, "layer": layer, "n": n, "k": k, "bpw": 6.0, "mse": 1e-3, "acos": 0.999,
             "e_out": 5e-3 if (v == "sop6" and i == len(layers) - 1) else e * (1 + 0.1 * i)}
            for v, e in e_layer.items()
            for i, layer in enumerate(layers)
        ]
    )
    paths = {}
    for table, frame in (("sensitivity", sensitivity), ("plan", plan), ("kernel", kernel),
                         ("eval", evaluation), ("eval_layers", eval_layers)):
        paths[table] = out / f"{table}.parquet"
        frame.to_parquet(paths[table], index=False)
    return paths


def write_benchmark(path: Path, seconds: float, rss: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time"
    path.write_text(f"{header}\n{seconds}\t0:00:{seconds:.0f}\t{rss}\t1\t1\t1\t0\t0\t0\t{seconds}\n")
    return path


CONFIG = {
    "families": {
        "smollm": {"kind": "causal_lm", "source_precision": "GGUF Q4_1"},
        "minilm": {"kind": "encoder", "source_precision": "fp32"},
    },
    "budget_bpw": 6.5,
    "layers": {"include": [".*"], "exclude": ["lm_head", "embed", "pooler"]},
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    families = {
        "smollm": {"kind": "causal_lm", "source_precision": "GGUF Q4_1",
                   **write_family(root, "smollm", LLM_LAYERS, LLM_EVAL, "cpu-interpreter")},
        "minilm": {"kind": "encoder", "source_precision": "fp32",
                   **write_family(root, "minilm", ENC_LAYERS, ENC_EVAL, "NVIDIA H100 80GB HBM3")},
    }
    benchmarks = [
        write_benchmark(root / "benchmarks" / "smollm" / "sensitivity.tsv", 123.4, 2048.0),
        write_benchmark(root / "benchmarks" / "fetch_text.tsv", 7.5, 55.0),
    ]
    return root, families, benchmarks


@pytest.fixture(scope="module")
def report(inputs):
    root, families, benchmarks = inputs
    out = root / "results" / "report.html"
    build_report(families, CONFIG, benchmarks, out)
    return out.read_text(encoding="utf-8")


def mark(page: str, family: str, variant: str, baseline: str, metric: str) -> str:
    found = re.findall(
        rf'<td class="(\w+)" data-family="{family}" data-variant="{variant}" data-baseline="{baseline}" '
        rf'data-metric="{metric}" data-result="([\w/]+)">([^<]*)',
        page,
    )
    assert len(found) == 1, (family, variant, baseline, metric, found)
    cls, result, text = found[0]
    return result, cls, text.strip()


def test_report_contents(report, inputs):
    root, _, _ = inputs
    assert not list((root / "results").glob(".report.html.*")), "temporary files left behind"
    for name in ("smollm", "minilm", *VARIANTS):
        assert name in report
    assert report.count("<svg") == 6  # three plots per family
    assert report.count("SOP promoted, budget sweep") == 2  # the frontier's legend, in each quality plot
    assert "4-5 bit grid" in report  # GGUF source flagged, once: minilm is fp32
    assert report.count("4-5 bit grid") == 1
    assert config_hash(CONFIG) in report
    assert "scipy" in report and "snakemake" in report


def test_report_is_self_contained_and_has_no_nan(report):
    assert not re.search(r"""(?:src|href)\s*=\s*["']\s*(?:https?:)?//""", report, flags=re.IGNORECASE)
    assert "<script" not in report and "<link" not in report and "@import" not in report
    assert "<!DOCTYPE svg" not in report  # SVG prologs (DTD URL) are stripped
    assert not re.search(r"\bnan\b", report, flags=re.IGNORECASE)
    assert "–" in report  # missing values are shown as a dash


def test_win_loss_marks(report):
    # E_out median: lower is better. sop6 1e-3 vs channel 2e-3 (win), vs tensor 4e-4 (loss)
    assert mark(report, "smollm", "sop6", "fp8_channel", "e_out_median") == ("win", "win", "✔ better")
    assert mark(report, "smollm", "sop6", "fp8_tensor", "e_out_median") == ("loss", "loss", "✘ worse")
    # KL mean: lower is better. sop6 0.02 vs channel 0.01 (loss), vs tensor 0.03 (win)
    assert mark(report, "smollm", "sop6", "fp8_channel", "kl_mean") == ("loss", "loss", "✘ worse")
    assert mark(report, "smollm", "sop6", "fp8_tensor", "kl_mean") == ("win", "win", "✔ better")
    # sop_promoted ties FP8 per channel on KL mean (0.01 both)
    assert mark(report, "smollm", "sop_promoted", "fp8_channel", "kl_mean") == ("tie", "tie", "= tie")
    # cosine: higher is better. sop6 0.9995 vs channel 0.999 (win)
    assert mark(report, "minilm", "sop6", "fp8_channel", "cosine_mean")[0] == "win"
    assert mark(report, "minilm", "sop6", "fp8_channel", "e_out_median")[0] == "win"
    assert "0.50×" in report  # sop6 / fp8_channel median E_out ratio on smollm


def test_layer_wins_and_sections(report, inputs):
    _, families, _ = inputs
    wins = layer_wins(pd.read_parquet(families["smollm"]["eval_layers"])).set_index(["variant", "baseline"])
    # sop6's last layer (5e-3) is above fp8_channel's (2e-3 * 1.5): 5 of 6 layers lower
    assert (wins.at[("sop6", "fp8_channel"), "lower"], wins.at[("sop6", "fp8_channel"), "layers"]) == (5, 6)
    assert wins.at[("sop6", "fp8_channel"), "worst_layer"] == LLM_LAYERS[-1]
    assert wins.at[("sop6", "fp8_channel"), "worst_ratio"] == pytest.approx(5e-3 / 3e-3)
    assert wins.loc[("sop_promoted", "fp8_channel"), ["lower", "layers"]].tolist() == [6, 6]
    assert "✘ 5 / 6" in report and "✔ 6 / 6" in report
    # kernel: interpreter without timings on smollm, speedup 50/20 on minilm
    assert "Triton interpreter on CPU checks correctness only" in report
    assert "NVIDIA H100 80GB HBM3" in report and "2.50×" in report
    # plan: 2 of 6 layers promoted (i % 3 == 2), 1 demoted
    assert "2 of 6 layers promoted above 6 bits, 1 demoted below" in report
    assert "the plan averages 6.823 bpw" in report and "exceeds its budget" not in report
    # benchmarks: rule, family, seconds, RSS
    assert "sensitivity" in report and "123.4" in report and "2,048" in report
    assert "fetch_text" in report and "all families" in report


def test_compare_to_fp8_directions():
    table = compare_to_fp8(LLM_EVAL, "causal_lm").set_index(["variant", "baseline", "metric"])["result"]
    assert table[("sop6", "fp8_channel", "e_out_median")] == "win"
    assert table[("sop6", "fp8_channel", "kl_mean")] == "loss"
    assert table[("sop_promoted", "fp8_channel", "kl_mean")] == "tie"
    encoder = ENC_EVAL.assign(cosine_mean=[1.0, 0.998, NAN, 0.999, 0.998])
    table = compare_to_fp8(encoder, "encoder").set_index(["variant", "baseline", "metric"])["result"]
    assert table[("sop6", "fp8_channel", "cosine_mean")] == "loss"  # higher is better
    assert table[("sop6", "fp8_tensor", "cosine_mean")] == "tie"
    assert table[("sop_promoted", "fp8_tensor", "cosine_mean")] == "n/a"


def test_read_benchmarks_family_from_folder(tmp_path):
    a = write_benchmark(tmp_path / "benchmarks" / "llm" / "fit.tsv", 3.0, 10.0)
    b = write_benchmark(tmp_path / "benchmarks" / "fetch.tsv", 1.0, 5.0)
    table = read_benchmarks([a, b], {"llm": {}})
    assert table["family"].isna().tolist() == [False, True]
    assert table.at[0, "family"] == "llm"
    assert table[["rule", "runs", "s", "max_rss"]].values.tolist() == [["fit", 1, 3.0, 10.0], ["fetch", 1, 1.0, 5.0]]


def test_bad_inputs_raise_clear_errors(inputs, tmp_path):
    _, families, _ = inputs
    missing = dict(families["smollm"], eval=tmp_path / "eval.parquet")
    LLM_EVAL[LLM_EVAL["variant"] != "fp8_tensor"].to_parquet(missing["eval"], index=False)
    with pytest.raises(ValueError, match="fp8_tensor"):
        build_report({"smollm": missing}, CONFIG, [], tmp_path / "r.html")
    with pytest.raises(ValueError, match="kind"):
        build_report({"smollm": dict(families["smollm"], kind="vision")}, CONFIG, [], tmp_path / "r.html")
    no_kl = dict(families["smollm"], eval=tmp_path / "no_kl.parquet")
    LLM_EVAL.drop(columns="kl_mean").to_parquet(no_kl["eval"], index=False)
    with pytest.raises(ValueError, match="kl_mean"):
        build_report({"smollm": no_kl}, CONFIG, [], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_snakemake_script(inputs, tmp_path):
    _, families, benchmarks = inputs
    names = ["minilm", "smollm"]
    tables = ("sensitivity", "plan", "kernel", "eval", "eval_layers")
    smk = SimpleNamespace(
        input=SimpleNamespace(**{t: [str(families[n][t]) for n in names] for t in tables},
                              benchmarks=[str(p) for p in benchmarks]),
        output=[str(tmp_path / "report.html")],
        log=[str(tmp_path / "report.log")],
        params=SimpleNamespace(families=names, config=CONFIG),
    )
    root_handlers = logging.root.handlers[:]
    try:
        runpy.run_path(str(SCRIPT), init_globals={"snakemake": smk})
    finally:  # the script configures the root logger of its own process; give pytest's back
        for handler in logging.root.handlers:
            handler.close()
        logging.root.handlers[:] = root_handlers
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    # families appear in params order
    assert page.index('id="family-minilm"') < page.index('id="family-smollm"')
    assert "GGUF Q4_1" in page and "wrote" in (tmp_path / "report.log").read_text()
