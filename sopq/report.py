"""Cross-family HTML report: SOP at 6 bits and SOP promoted under a budget against FP8 E4M3.

The report is one self-contained file: plain HTML, a small inline stylesheet and plots as
inline SVG with text kept as text (small, searchable), so it opens offline and travels as one
attachment. Inputs are the per-family Parquet tables of the pipeline (sensitivity, plan,
kernel, eval, eval_layers) and the Snakemake benchmark TSV files.

Layers are shown in the order the plan lists them (the pipeline writes layers in model order),
followed by any layer only the evaluation knows.
"""
from __future__ import annotations

import html
import importlib.metadata
import io
import json
import logging
import math
import os
import platform
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from sopq.config import config_hash
from sopq.formats import average_bpw
from sopq.variants import UNIFORM_BITS, alpha_validation, quality_table
from sopq.io import atomic_path

log = logging.getLogger(__name__)

KINDS = ("causal_lm", "encoder")
SOP_VARIANTS = ("sop6", "sop_promoted")
FP8_VARIANTS = ("fp8_channel", "fp8_tensor")
REQUIRED_VARIANTS = ("reference", *SOP_VARIANTS, *FP8_VARIANTS)

VARIANT_LABELS = {
    "reference": "unquantized",
    "sop6": f"SOP, uniform {UNIFORM_BITS}-bit",
    "sop_promoted": "SOP, promoted under the budget",
    "fp8_channel": "FP8 E4M3, one scale per output channel",
    "fp8_tensor": "FP8 E4M3, one power-of-two scale per tensor",
    "fp6_e2m3_mx": "FP6 E2M3, MX blocks of 32 with E8M0 scales",
    "fp6_e3m2_mx": "FP6 E3M2, MX blocks of 32 with E8M0 scales",
    "fp6_e2m3_channel": "FP6 E2M3, one scale per output channel",
    "fp6_e3m2_channel": "FP6 E3M2, one scale per output channel",
    "int8_channel": "INT8 symmetric, one scale per output channel",
    "int6_channel": "INT6 symmetric, one scale per output channel",
}
VARIANT_COLORS = {
    "reference": "#000000",
    "sop6": "#1f77b4",
    "sop_promoted": "#2ca02c",
    "fp8_channel": "#ff7f0e",
    "fp8_tensor": "#d62728",
}
OTHER_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939")
# Marker by format family, so ~20 variants stay tellable apart with few colours.
MARKERS = (("sop", "o"), ("fp8", "s"), ("fp6", "D"), ("int", "^"))

# metric column -> (label, lower is better, number format)
METRICS = {
    "bpw": ("bpw", True, "{:.3f}"),
    "e_out_median": ("E_out median", True, "{:.3g}"),
    "e_out_p95": ("E_out p95", True, "{:.3g}"),
    "e_out_max": ("E_out max", True, "{:.3g}"),
    "ppl": ("perplexity", True, "{:.4g}"),
    "kl_mean": ("KL mean", True, "{:.3g}"),
    "kl_p99": ("KL p99", True, "{:.3g}"),
    "top1": ("top-1 agreement", False, "{:.4f}"),
    "cosine_mean": ("cosine mean", False, "{:.6f}"),
    "cosine_min": ("cosine min", False, "{:.6f}"),
}
END_TO_END = {"causal_lm": ("ppl", "kl_mean", "kl_p99", "top1"), "encoder": ("cosine_mean", "cosine_min")}
# The end-to-end metric the win/loss marks use. KL from the unquantized model measures what
# quantization did to the outputs; perplexity mixes that with the model's own error on the text.
PRIMARY_END_TO_END = {"causal_lm": "kl_mean", "encoder": "cosine_mean"}

SENSITIVITY_COLUMNS = ("layer", "bits", "group", "scale_format", "n", "k", "bpw", "e_out", "mse", "acos", "alpha")
PLAN_COLUMNS = ("layer", "bits", "group", "scale_format", "n", "k", "bpw", "e_out_pred", "alpha", "budget_bpw")
KERNEL_COLUMNS = ("layer", "bits", "n", "k", "m", "max_abs_err", "rel_err", "device", "kernel_us", "torch_us")
EVAL_LAYERS_COLUMNS = ("variant", "layer", "n", "k", "bpw", "e_out", "mse", "acos")
EVAL_COLUMNS = ("variant", "bpw", "e_out_median", "e_out_p95", "e_out_max")
FAMILY_ENTRIES = ("kind", "source_precision", "sensitivity", "plan", "kernel", "eval", "eval_layers")

PACKAGES = ("torch", "transformers", "triton", "snakemake", "scipy", "numpy", "pandas", "pyarrow", "matplotlib")

MARKS = {"win": "✔ better", "loss": "✘ worse", "tie": "= tie", "n/a": "–"}

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1a1a1a;
max-width:1200px;margin:0 auto;padding:1rem 1.5rem 3rem}
h1{font-size:1.6rem;margin:.4rem 0}
h2{font-size:1.3rem;margin-top:2.4rem;border-bottom:2px solid #ddd;padding-bottom:.2rem}
h3{font-size:1.05rem;margin:1.4rem 0 .4rem}
nav a{margin-right:1rem}
.meta,figcaption,.legend{color:#555;font-size:.88rem}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:.85rem;margin:.4rem 0 .9rem}
th,td{border:1px solid #d6d6d6;padding:.2rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.win{background:#e3f4e3;color:#14591a}
td.loss{background:#fbe4e4;color:#8a1616}
td.tie,td.na{background:#f3f3f3;color:#555}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5rem .8rem;margin:.6rem 0}
figure{margin:.6rem 0 1.2rem}
figure svg{max-width:100%;height:auto}
details{margin:.6rem 0}
summary{cursor:pointer}
pre{background:#f6f6f6;padding:.6rem;overflow-x:auto;font-size:.8rem}
"""


@dataclass
class Family:
    name: str
    kind: str
    source_precision: str
    sensitivity: pd.DataFrame
    plan: pd.DataFrame
    kernel: pd.DataFrame
    eval: pd.DataFrame  # indexed by variant, required variants first
    eval_layers: pd.DataFrame
    layers: list[str]  # model order
    budget_bpw: float
    pareto: pd.DataFrame | None = None  # the budget sweep (sopq.promote.budget_sweep), when given


# ----------------------------------------------------------------------------- inputs


def _read_table(path, columns, family: str, what: str) -> pd.DataFrame:
    table = pd.read_parquet(path)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(
            f"family {family!r}: {what} table {path} lacks columns {missing}; rerun the stage that writes it"
        )
    return table


def _load_family(name: str, spec: dict) -> Family:
    missing = [e for e in FAMILY_ENTRIES if e not in spec]
    if missing:
        raise ValueError(f"family {name!r}: the report needs entries {missing} (have {sorted(spec)})")
    kind = spec["kind"]
    if kind not in KINDS:
        raise ValueError(
            f"family {name!r}: kind {kind!r} is not one of {KINDS}; set config['families'][{name!r}]['kind']"
        )

    evaluation = _read_table(spec["eval"], EVAL_COLUMNS + END_TO_END[kind], name, "eval")
    if evaluation["variant"].duplicated().any():
        dup = sorted(set(evaluation.loc[evaluation["variant"].duplicated(), "variant"]))
        raise ValueError(f"family {name!r}: eval table {spec['eval']} has several rows for variants {dup}")
    absent = [v for v in REQUIRED_VARIANTS if v not in set(evaluation["variant"])]
    if absent:
        raise ValueError(
            f"family {name!r}: eval table {spec['eval']} has no rows for variants {absent}; "
            f"the evaluation must cover {list(REQUIRED_VARIANTS)}"
        )
    extra = [v for v in evaluation["variant"] if v not in REQUIRED_VARIANTS]
    evaluation = evaluation.set_index("variant").loc[[*REQUIRED_VARIANTS, *extra]]

    eval_layers = _read_table(spec["eval_layers"], EVAL_LAYERS_COLUMNS, name, "eval_layers")
    if eval_layers.duplicated(["variant", "layer"]).any():
        raise ValueError(f"family {name!r}: eval_layers table {spec['eval_layers']} repeats (variant, layer) pairs")
    absent = [v for v in (*SOP_VARIANTS, *FP8_VARIANTS) if v not in set(eval_layers["variant"])]
    if absent:
        raise ValueError(f"family {name!r}: eval_layers table {spec['eval_layers']} has no rows for variants {absent}")

    plan = _read_table(spec["plan"], PLAN_COLUMNS, name, "plan")
    budgets = plan["budget_bpw"].unique()
    if len(budgets) != 1 or not np.isfinite(budgets[0]):
        raise ValueError(
            f"family {name!r}: plan table {spec['plan']} has budget_bpw values {list(budgets)}, expected one number"
        )
    if plan["layer"].duplicated().any():
        raise ValueError(f"family {name!r}: plan table {spec['plan']} lists a layer twice")

    return Family(
        name=name,
        kind=kind,
        source_precision=str(spec["source_precision"]),
        sensitivity=_read_table(spec["sensitivity"], SENSITIVITY_COLUMNS, name, "sensitivity"),
        plan=plan.reset_index(drop=True),
        kernel=_read_table(spec["kernel"], KERNEL_COLUMNS, name, "kernel"),
        eval=evaluation,
        eval_layers=eval_layers,
        layers=list(dict.fromkeys([*plan["layer"], *eval_layers["layer"]])),
        budget_bpw=float(budgets[0]),
        pareto=pd.read_parquet(spec["pareto"]) if spec.get("pareto") else None,
    )


def read_benchmarks(paths, families) -> pd.DataFrame:
    """One row per Snakemake benchmark file: family (missing for family-free rules, whose files
    sit directly in the benchmarks folder), rule (file stem), runs, s (mean wall time), max_rss (MB, max)."""
    rows = []
    for path in map(Path, paths):
        table = pd.read_csv(path, sep="\t", na_values=["-", "NA"])
        missing = sorted({"s", "max_rss"} - set(table.columns))
        if missing:
            raise ValueError(f"benchmark file {path} lacks columns {missing}; expected a Snakemake benchmark: TSV")
        rows.append(
            {
                "family": path.parent.name if path.parent.name in families else None,
                "rule": path.stem,
                "runs": len(table),
                "s": table["s"].mean(),
                "max_rss": table["max_rss"].max(),
            }
        )
    return pd.DataFrame(rows, columns=["family", "rule", "runs", "s", "max_rss"])


# ----------------------------------------------------------------------------- numbers


def compare_to_fp8(eval_table: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Win/loss of each SOP variant against each FP8 baseline on median E_out and on the kind's
    primary end-to-end metric (KL mean for causal LMs, cosine mean for encoders).

    eval_table: rows of eval.parquet (a `variant` column or index). Returns one row per
    (variant, baseline, metric) with columns sop, fp8 and result: 'win', 'loss', 'tie', or
    'n/a' when either value is missing.
    """
    table = eval_table if eval_table.index.name == "variant" else eval_table.set_index("variant")
    rows = []
    for variant in SOP_VARIANTS:
        for baseline in FP8_VARIANTS:
            for metric in ("e_out_median", PRIMARY_END_TO_END[kind]):
                sop, fp8 = float(table.at[variant, metric]), float(table.at[baseline, metric])
                if math.isnan(sop) or math.isnan(fp8):
                    result = "n/a"
                elif sop == fp8:
                    result = "tie"
                else:
                    result = "win" if (sop < fp8) == METRICS[metric][1] else "loss"
                rows.append(
                    {"variant": variant, "baseline": baseline, "metric": metric,
                     "sop": sop, "fp8": fp8, "result": result}
                )
    return pd.DataFrame(rows)


def layer_wins(eval_layers: pd.DataFrame) -> pd.DataFrame:
    """Per SOP variant and FP8 baseline: layers where SOP's E_out is lower, layers compared,
    and the worst ratio SOP / FP8 with its layer (the claim is: lower on every layer)."""
    e_out = eval_layers.pivot(index="layer", columns="variant", values="e_out")
    rows = []
    for variant in SOP_VARIANTS:
        for baseline in FP8_VARIANTS:
            pair = e_out[[variant, baseline]].dropna()
            ratio = pair[variant] / pair[baseline]
            rows.append(
                {
                    "variant": variant,
                    "baseline": baseline,
                    "lower": int((pair[variant] < pair[baseline]).sum()),
                    "layers": len(pair),
                    "worst_ratio": ratio.max() if ratio.notna().any() else float("nan"),
                    "worst_layer": ratio.idxmax() if ratio.notna().any() else None,
                }
            )
    return pd.DataFrame(rows)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- HTML pieces


def _fmt(value, fmt: str = "{:.3g}") -> str:
    """A number for display; missing values show as '–', never 'nan'."""
    if value is None or pd.isna(value):
        return "–"
    value = float(value)
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return fmt.format(value)


def _text(value) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "–"
    return html.escape(str(value))


def _cell(content: str, tag: str = "td", **attrs) -> str:
    """content is ready HTML; attrs become attributes (cls -> class, data_x -> data-x)."""
    parts = "".join(
        f' {"class" if key == "cls" else key.replace("_", "-")}="{html.escape(str(value))}"'
        for key, value in attrs.items()
        if value is not None
    )
    return f"<{tag}{parts}>{content}</{tag}>"


def _num(value, fmt: str = "{:.3g}") -> str:
    return _cell(_fmt(value, fmt), cls="num")


def _th(text: str, **attrs) -> str:
    return _cell(html.escape(text), tag="th", **attrs)


def _table(head: list[list[str]], rows: list[list[str]]) -> str:
    thead = "".join(f"<tr>{''.join(row)}</tr>" for row in head)
    tbody = "".join(f"<tr>{''.join(row)}</tr>" for row in rows)
    return f'<div class="scroll"><table><thead>{thead}</thead><tbody>{tbody}</tbody></table></div>'


def _key_values(pairs: list[tuple[str, str]]) -> str:
    """pairs of (plain-text key, ready-HTML value)."""
    return _table([], [[_th(key), _cell(value)] for key, value in pairs])


def _metric_header(metric: str) -> str:
    label, lower, _ = METRICS[metric]
    return f"{label} {'↓' if lower else '↑'}"


def _variant_label(variant: str, family: Family) -> str:
    label = VARIANT_LABELS.get(variant, "")
    if variant == "sop_promoted":
        label = f"SOP, promoted under a {family.budget_bpw:g} bpw budget"
    return label


def _anchor(name: str) -> str:
    return "family-" + re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _is_gguf(source_precision: str) -> bool:
    return bool(re.search(r"gguf|\bq\d", source_precision, flags=re.IGNORECASE))


# ----------------------------------------------------------------------------- plots


def _svg(fig: Figure, salt: str) -> str:
    """The figure as an inline <svg> element. Text stays text (small files); the hash salt
    makes ids deterministic and distinct between the figures of one page."""
    buffer = io.StringIO()
    with mpl.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        no_metadata = dict.fromkeys(("Creator", "Date", "Format", "Type"))  # no date, no URLs
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata=no_metadata)
    svg = buffer.getvalue()
    return svg[svg.index("<svg") :]  # drop the XML prolog and DOCTYPE (they reference a DTD URL)


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _variant_styles(variants) -> dict[str, tuple[str, str]]:
    """variant -> (colour, marker): SOP circles, FP8 squares, FP6 diamonds, INT triangles."""
    others = iter(OTHER_COLORS * (1 + len(variants) // len(OTHER_COLORS)))
    styles = {}
    for variant in variants:
        colour = VARIANT_COLORS.get(variant) or next(others)
        marker = next((m for prefix, m in MARKERS if variant.startswith(prefix)), "v")
        styles[variant] = (colour, marker)
    return styles


def _short_names(layers: list[str]) -> list[str]:
    """Layer names without the dotted prefix all of them share (model.layers. ...)."""
    parts = [layer.split(".") for layer in layers]
    common = 0
    while parts and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


def _layer_axis(ax, layers: list[str], max_labels: int = 48) -> None:
    step = max(1, math.ceil(len(layers) / max_labels))
    ticks = np.arange(0, len(layers), step)
    names = _short_names(layers)
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=6)
    ax.set_xlim(-0.7, len(layers) - 0.3)
    ax.set_xlabel("layer, in model order" + (f" (every {step}th labelled)" if step > 1 else ""))


def _plot_layer_errors(family: Family) -> str:
    e_out = family.eval_layers.pivot(index="layer", columns="variant", values="e_out").reindex(family.layers)
    styles = _variant_styles(family.eval.index)
    fig = Figure(figsize=(10, 3.6))
    ax = fig.subplots()
    x = np.arange(len(family.layers))
    for variant in (*SOP_VARIANTS, *FP8_VARIANTS):
        colour, marker = styles[variant]
        ax.plot(x, e_out[variant].to_numpy(dtype=float), marker=marker, ms=3, lw=1, color=colour, label=variant)
    ax.set_yscale("log")
    ax.set_ylabel("E_out (log scale)")
    ax.grid(True, which="major", alpha=0.3)
    _layer_axis(ax, family.layers)
    ax.legend(ncols=4, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return _svg(fig, f"{family.name}-layers")


def _plot_quality_vs_bpw(family: Family) -> str | None:
    """The Pareto view: SOP promoted at every evaluated budget as one line (its frontier), every
    other variant as a point."""
    quantized = family.eval.drop(index="reference")
    metrics = [m for m in ("e_out_median", *END_TO_END[family.kind]) if quantized[m].notna().any()]
    if not metrics:
        return None
    frontier_names = [v for v in quantized.index if v == "sop_promoted" or v.startswith("sop_promoted@")]
    points = quantized.drop(index=frontier_names)
    frontier = quantized.loc[frontier_names].sort_values("bpw")
    styles = _variant_styles(points.index)
    frontier_colour = VARIANT_COLORS["sop_promoted"]
    ncols = len(metrics) if len(metrics) <= 3 else math.ceil(len(metrics) / 2)  # keep text readable
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(3.3 * ncols, 2.7 * nrows + 1.2), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(metrics) :]:
        ax.remove()
    for ax, metric in zip(axes, metrics):
        reference = family.eval.at["reference", metric]
        if pd.notna(reference):
            ax.axhline(float(reference), color="black", ls=":", lw=1)
        line = frontier[frontier["bpw"].notna() & frontier[metric].notna()]
        ax.plot(line["bpw"].astype(float), line[metric].astype(float), marker="o", ms=5, color=frontier_colour)
        for variant, row in points.iterrows():
            if pd.notna(row["bpw"]) and pd.notna(row[metric]):
                colour, marker = styles[variant]
                ax.plot(float(row["bpw"]), float(row[metric]), marker=marker, ms=6, ls="none", color=colour)
        if metric == "e_out_median":
            ax.set_yscale("log")
        ax.set_title(_metric_header(metric) + " better", fontsize=9)
        ax.set_xlabel("all-in bits per weight", fontsize=8)
        ax.grid(True, alpha=0.3)
    handles = (
        [Line2D([], [], marker="o", ms=5, color=frontier_colour, label="SOP promoted, budget sweep")]
        + [Line2D([], [], marker=styles[v][1], color=styles[v][0], ls="none", label=v) for v in points.index]
        + [Line2D([], [], color="black", ls=":", label="reference (unquantized)")]
    )
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize=8, frameon=False)
    return _svg(fig, f"{family.name}-quality")


def _plot_bits(family: Family) -> str:
    plan = family.plan
    bits = plan["bits"].to_numpy()
    colours = np.where(bits > UNIFORM_BITS, "#2ca02c", np.where(bits < UNIFORM_BITS, "#9467bd", "#b0b0b0"))
    x = np.arange(len(plan))
    fig = Figure(figsize=(10, 3.4))
    ax = fig.subplots()
    ax.bar(x, bits, color=colours, width=0.8)
    ax.set_ylim(min(bits.min(), UNIFORM_BITS) - 1.5, max(bits.max(), UNIFORM_BITS) + 0.6)
    ax.set_yticks(np.arange(min(bits.min(), UNIFORM_BITS) - 1, max(bits.max(), UNIFORM_BITS) + 1))
    ax.set_ylabel("bits chosen")
    _layer_axis(ax, list(plan["layer"]))
    alpha_ax = ax.twinx()
    alpha = plan["alpha"].to_numpy(dtype=float)
    alpha_ax.plot(x, alpha, color="black", marker=".", ms=5, ls="none")
    if (alpha > 0).all():
        alpha_ax.set_yscale("log")
    alpha_ax.set_ylabel("alpha (importance)")
    handles = [
        Patch(color="#2ca02c", label=f"promoted (> {UNIFORM_BITS} bits)"),
        Patch(color="#b0b0b0", label=f"{UNIFORM_BITS} bits"),
        Patch(color="#9467bd", label=f"demoted (< {UNIFORM_BITS} bits)"),
        Line2D([], [], color="black", marker=".", ls="none", label="alpha"),
    ]
    ax.legend(handles=handles, ncols=4, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return _svg(fig, f"{family.name}-bits")


# ----------------------------------------------------------------------------- sections


def _summary_section(families: list[Family], layers_config: dict) -> str:
    head = [
        [
            _th("family", rowspan=2),
            _th("SOP variant", rowspan=2),
            _th("bpw ↓", rowspan=2),
            _th("end-to-end metric", rowspan=2),
            _th("vs FP8 E4M3 per channel", colspan=3),
            _th("vs FP8 E4M3 per tensor", colspan=3),
        ],
        [_th("E_out median"), _th("end-to-end"), _th("layers with lower E_out")] * 2,
    ]
    rows = []
    for family in families:
        verdicts = compare_to_fp8(family.eval, family.kind).set_index(["variant", "baseline", "metric"])
        wins = layer_wins(family.eval_layers).set_index(["variant", "baseline"])
        primary = PRIMARY_END_TO_END[family.kind]
        label, lower, fmt = METRICS[primary]
        for variant in SOP_VARIANTS:
            row = [
                _cell(f'<a href="#{_anchor(family.name)}">{html.escape(family.name)}</a>'),
                _cell(f"<code>{variant}</code>"),
                _num(family.eval.at[variant, "bpw"], METRICS["bpw"][2]),
                _cell(f"{html.escape(label)} ({'lower' if lower else 'higher'} is better)"),
            ]
            for baseline in FP8_VARIANTS:
                for metric in ("e_out_median", primary):
                    v = verdicts.loc[(variant, baseline, metric)]
                    if metric == "e_out_median":
                        detail = _fmt(v["sop"] / v["fp8"], "{:.2f}×") if v["fp8"] > 0 else "–"
                    else:
                        detail = f"{_fmt(v['sop'], fmt)} vs {_fmt(v['fp8'], fmt)}"
                    row.append(
                        _cell(
                            f"{MARKS[v['result']]} <small>{detail}</small>",
                            cls=v["result"].replace("n/a", "na"),
                            data_family=family.name,
                            data_variant=variant,
                            data_baseline=baseline,
                            data_metric=metric,
                            data_result=v["result"],
                        )
                    )
                w = wins.loc[(variant, baseline)]
                every = w["lower"] == w["layers"] and w["layers"] > 0
                row.append(
                    _cell(f"{'✔' if every else '✘'} {w['lower']} / {w['layers']}", cls="win" if every else "loss")
                )
            rows.append(row)
    verdict = _table(head, rows)

    tables = []
    for kind, title in (("causal_lm", "Causal language models"), ("encoder", "Encoders")):
        members = [f for f in families if f.kind == kind]
        if not members:
            continue
        columns = ["bpw", "e_out_median", "e_out_p95", "e_out_max", *END_TO_END[kind]]
        head = [[_th("family"), _th("variant"), _th("what it is"), *(_th(_metric_header(c)) for c in columns)]]
        rows = [
            [
                _cell(html.escape(f.name)),
                _cell(f"<code>{html.escape(variant)}</code>"),
                _cell(html.escape(_variant_label(variant, f))),
                *(_num(values[c], METRICS[c][2]) for c in columns),
            ]
            for f in members
            for variant, values in f.eval.iterrows()
        ]
        tables.append(f"<h3>{title}: every variant</h3>{_table(head, rows)}")

    return f"""<section id="summary"><h2>Summary: SOP against FP8 E4M3</h2>
<p>Claim under test: SOP at ≤ 6.5 bits per weight has lower output error <code>E_out</code> than FP8
E4M3 with one scale per output channel on every layer of every family, and no worse end-to-end
quality. Each cell says whether the SOP variant is better or worse than the FP8 baseline; where
the claim fails, it shows here.</p>
<p class="legend"><code>E_out = tr(dW H dW^T) / tr(W H W^T)</code>, the relative error of a layer's
outputs on calibration inputs: lower is better; the E_out column gives the ratio SOP / FP8 of the
medians over layers (below 1: SOP better). bpw counts everything stored (codes, scales, codebook):
lower is better. End-to-end: KL divergence from the unquantized model's next-token distribution
(lower is better) for causal LMs, cosine similarity of pooled embeddings to the unquantized
model's (higher is better) for encoders; perplexity lower, top-1 agreement higher.
↓ / ↑ in headers: lower / higher is better. – : not measured.</p>
<p class="legend">Quantized: every linear layer whose name matches a pattern of
<code>layers.include</code> ({_patterns(layers_config["include"])}) and none of <code>layers.exclude</code>
({_patterns(layers_config["exclude"])}); an LM head tied to the token embedding is never quantized.
Embeddings, the LM head, norms and biases stay in the source precision and are not counted in bpw.</p>
{verdict}
{''.join(tables)}
</section>"""


def _patterns(patterns: list[str]) -> str:
    return ", ".join(f"<code>{html.escape(p)}</code>" for p in patterns) or "none"


def _plan_part(family: Family) -> str:
    plan = family.plan
    promoted = plan[plan["bits"] > UNIFORM_BITS].sort_values("alpha", ascending=False)
    demoted = (plan["bits"] < UNIFORM_BITS).sum()
    average = average_bpw(plan)
    text = (
        f"<p>Budget {family.budget_bpw:g} bpw; the plan averages {_fmt(average, '{:.3f}')} bpw "
        f"(weighted by layer size). {len(promoted)} of {len(plan)} layers promoted above "
        f"{UNIFORM_BITS} bits, {demoted} demoted below. Bars: bits per layer; dots: alpha, how much "
        f"the model output moves per unit of the layer's E_out.</p>"
    )
    if average > family.budget_bpw + 1e-9:
        text += '<p class="note">The plan exceeds its budget: check the promote stage.</p>'
    if promoted.empty:
        return text
    shown = promoted.head(20)
    rows = [
        [_cell(html.escape(r.layer)), _num(r.bits, "{:.0f}"), _num(r.alpha), _num(r.e_out_pred), _num(r.bpw, "{:.3f}")]
        for r in shown.itertuples()
    ]
    more = f"<p class='legend'>and {len(promoted) - len(shown)} more (all in the per-layer table below)</p>"
    return (
        text
        + _table([[_th("promoted layer"), _th("bits"), _th("alpha"), _th("E_out predicted"), _th("bpw")]], rows)
        + (more if len(promoted) > len(shown) else "")
    )


def _sensitivity_part(family: Family) -> str:
    stats = (
        family.sensitivity.groupby(["bits", "group", "scale_format"], sort=True)
        .agg(layers=("layer", "nunique"), bpw=("bpw", "median"), e_median=("e_out", "median"), e_max=("e_out", "max"))
        .reset_index()
    )
    head = [[_th(h) for h in ("bits", "group", "scale format", "layers", "median bpw", "median E_out", "max E_out")]]
    rows = [
        [
            _num(r.bits, "{:.0f}"),
            _num(r.group, "{:.0f}"),
            _cell(_text(r.scale_format)),
            _num(r.layers, "{:.0f}"),
            _num(r.bpw, "{:.3f}"),
            _num(r.e_median),
            _num(r.e_max),
        ]
        for r in stats.itertuples()
    ]
    return "<p>What each option costs, from the real fits at every allowed bit width:</p>" + _table(head, rows)


def _quality_table_part(family: Family) -> str:
    """Every variant with its bpw, E_out spread, ratio to FP8 per channel and end-to-end damage
    (sopq.variants.quality_table), and the check of alpha against the budget sweep."""
    table = quality_table(family.eval.reset_index(), family.eval_layers, family.kind)
    damage = table.columns[-1]
    head = [[_th(h) for h in ("variant", "error feedback", "all-in bpw", "median E_out", "p95 E_out", "worst E_out",
                                "median E_out / FP8 channel", "layers beating FP8 channel", damage)]]
    rows = [
        [_cell(f"<code>{html.escape(r['variant'])}</code>"), _cell("yes" if r["error_feedback"] else "no"),
         _num(r["bpw"], "{:.3f}"), _num(r["e_out_median"]), _num(r["e_out_p95"]), _num(r["e_out_max"]),
         _num(r["ratio_to_fp8_median"], "{:.2f}"), _num(r["layers_beating_fp8"], "{:.0%}"), _num(r[damage])]
        for r in table.to_dict("records")
    ]
    out = _table(head, rows)
    if family.pareto is not None:
        check = alpha_validation(family.eval.reset_index(), family.pareto, family.kind, family.budget_bpw)
        if len(check) >= 3:
            r = np.corrcoef(check["predicted"], check[damage])[0, 1]
            rho = check["predicted"].rank().corr(check[damage].rank())
            out += (f"<p>Layer importance check: over {len(check)} budgets of the sweep, the predicted "
                    f"sum<sub>l</sub> alpha<sub>l</sub> E_out(l) and the measured {html.escape(damage)} correlate "
                    f"with Pearson r = {r:.3f}, Spearman rho = {rho:.3f}.</p>")
            out += _table([[_th(h) for h in ("budget", "bpw", "predicted", damage)]],
                          [[_num(c["budget_bpw"], "{:g}"), _num(c["bpw"], "{:.3f}"), _num(c["predicted"]), _num(c[damage])]
                           for c in check.to_dict("records")])
    return out


def _kernel_part(family: Family) -> str:
    kernel = family.kernel
    if kernel.empty:
        return '<p class="note">No layer was checked against the reference matmul.</p>'
    devices = ", ".join(map(str, dict.fromkeys(kernel["device"])))
    pairs = [
        ("layers checked", f"{kernel['layer'].nunique()} of {len(family.plan)} in the plan"),
        ("checks (layer × m)", str(len(kernel))),
        ("device", html.escape(devices)),
        ("m (rows of x)", html.escape(", ".join(str(m) for m in sorted(kernel["m"].unique())))),
    ]
    for column, label in (("rel_err", "worst relative error"), ("max_abs_err", "worst max abs error")):
        if kernel[column].notna().any():
            worst = kernel.loc[kernel[column].idxmax()]
            where = f"{worst['layer']}, {worst['bits']} bits, m = {worst['m']}"
            pairs.append((label, f"{_fmt(worst[column])} ({html.escape(where)})"))
        else:
            pairs.append((label, "–"))
    timed = kernel[kernel["kernel_us"].notna()]
    if timed.empty:
        why = (
            "the Triton interpreter on CPU checks correctness only"
            if set(kernel["device"]) == {"cpu-interpreter"}
            else "not measured"
        )
        pairs.append(("timings", f"none: {why}"))
        return _key_values(pairs)
    speed = timed.assign(speedup=timed["torch_us"] / timed["kernel_us"])
    stats = (
        speed.groupby(["device", "m"], sort=True)
        .agg(
            layers=("layer", "nunique"),
            kernel_us=("kernel_us", "median"),
            torch_us=("torch_us", "median"),
            median=("speedup", "median"),
            worst=("speedup", "min"),
            best=("speedup", "max"),
        )
        .reset_index()
    )
    head = [
        [_th(h) for h in ("device", "m", "layers", "kernel µs (median)", "torch µs (median)")]
        + [_th(h) for h in ("speedup median", "speedup min", "speedup max")]
    ]
    rows = [
        [
            _cell(_text(r.device)),
            _num(r.m, "{:.0f}"),
            _num(r.layers, "{:.0f}"),
            _num(r.kernel_us, "{:.1f}"),
            _num(r.torch_us, "{:.1f}"),
            _num(r.median, "{:.2f}×"),
            _num(r.worst, "{:.2f}×"),
            _num(r.best, "{:.2f}×"),
        ]
        for r in stats.itertuples()
    ]
    return (
        _key_values(pairs)
        + "<p class='legend'>speedup = torch µs / kernel µs, above 1: the packed SOP kernel is faster "
        "than the dense torch matmul timed beside it.</p>"
        + _table(head, rows)
    )


def _layer_details(family: Family) -> str:
    plan = family.plan.set_index("layer").reindex(family.layers)
    e_out = family.eval_layers.pivot(index="layer", columns="variant", values="e_out").reindex(family.layers)
    shapes = family.eval_layers.drop_duplicates("layer").set_index("layer").reindex(family.layers)
    variants = (*SOP_VARIANTS, *FP8_VARIANTS)
    head = [
        [_th(h) for h in ("layer", "n × k", "bits", "group", "scale", "bpw", "alpha", "E_out predicted")]
        + [_th(f"E_out {v}") for v in variants]
    ]
    rows = []
    for layer in family.layers:
        p, s = plan.loc[layer], shapes.loc[layer]
        n, k = (p["n"], p["k"]) if pd.notna(p["n"]) else (s["n"], s["k"])
        rows.append(
            [
                _cell(html.escape(layer)),
                _cell(f"{_fmt(n, '{:.0f}')} × {_fmt(k, '{:.0f}')}", cls="num"),
                _num(p["bits"], "{:.0f}"),
                _num(p["group"], "{:.0f}"),
                _cell(_text(p["scale_format"])),
                _num(p["bpw"], "{:.3f}"),
                _num(p["alpha"]),
                _num(p["e_out_pred"]),
                *(_num(e_out.at[layer, v]) for v in variants),
            ]
        )
    return (
        f"<details><summary>Per-layer plan and errors ({len(family.layers)} layers)</summary>"
        f"{_table(head, rows)}</details>"
    )


def _family_section(family: Family) -> str:
    precision = html.escape(family.source_precision)
    note = ""
    if _is_gguf(family.source_precision):
        note = (
            f'<p class="note">Source weights are {precision}: they already sit on a 4-5 bit grid, so '
            "reconstructing them is easier than reconstructing full-precision weights. That flatters "
            "every quantizer here, SOP and FP8 alike: read this family's errors as optimistic.</p>"
        )
    wins = layer_wins(family.eval_layers)
    win_rows = [
        [
            _cell(f"<code>{w.variant}</code>"),
            _cell(f"<code>{w.baseline}</code>"),
            _cell(f"{w.lower} / {w.layers}", cls="win" if w.lower == w.layers and w.layers > 0 else "loss"),
            _num(w.worst_ratio, "{:.2f}×"),
            _cell(_text(w.worst_layer)),
        ]
        for w in wins.itertuples()
    ]
    win_table = _table(
        [[_th(h) for h in ("SOP variant", "baseline", "layers with lower E_out", "worst ratio SOP / FP8", "at layer")]],
        win_rows,
    )
    quality = _plot_quality_vs_bpw(family)
    quality_html = (
        _figure(quality, "Each variant as a point: quality against all-in bits per weight; dotted: unquantized.")
        if quality
        else "<p>No quality numbers in the evaluation.</p>"
    )
    kind = "causal language model" if family.kind == "causal_lm" else "encoder"
    return f"""<section id="{_anchor(family.name)}"><h2>{html.escape(family.name)}</h2>
<p>{kind}; source precision <strong>{precision}</strong>; {len(family.layers)} quantized layers;
SOP budget {family.budget_bpw:g} bpw.</p>
{note}
<h3>Per-layer output error</h3>
{_figure(_plot_layer_errors(family), "E_out per layer (log scale, lower is better), layers in model order.")}
{win_table}
<h3>Quality against bits per weight</h3>
{quality_html}
<h3>Every variant</h3>
{_quality_table_part(family)}
<h3>Bits chosen per layer</h3>
{_plan_part(family)}
{_figure(_plot_bits(family), "Bits chosen by the budgeted plan (bars) and layer importance alpha (dots).")}
<h3>Sensitivity</h3>
{_sensitivity_part(family)}
<h3>Kernel validation</h3>
{_kernel_part(family)}
{_layer_details(family)}
</section>"""


def _provenance_section(config: dict, benchmarks: pd.DataFrame, generated: str) -> str:
    machine = [
        ("config sha256", f"<code>{config_hash(config)}</code>"),
        ("generated", html.escape(generated)),
        ("platform", html.escape(platform.platform())),
        ("CPU", html.escape(f"{_cpu_model()} ({os.cpu_count()} logical cores)")),
        *((name, html.escape(version)) for name, version in package_versions().items()),
    ]
    if benchmarks.empty:
        timing = "<p>No benchmark files.</p>"
    else:
        rows = [
            [
                _cell(html.escape(r.rule)),
                _cell("all families" if pd.isna(r.family) else _text(r.family)),
                _num(r.runs, "{:.0f}"),
                _num(r.s, "{:,.1f}"),
                _num(r.max_rss, "{:,.0f}"),
            ]
            for r in benchmarks.itertuples()
        ]
        rows.append(
            [_cell("<strong>total</strong>"), _cell(""), _cell(""), _num(benchmarks["s"].sum(), "{:,.1f}"), _cell("")]
        )
        head = [[_th(h) for h in ("stage (rule)", "family", "runs", "wall time s", "max RSS MB")]]
        timing = _table(head, rows)
    config_json = html.escape(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False, default=str))
    return f"""<section id="provenance"><h2>Provenance</h2>
{_key_values(machine)}
<h3>Run time per stage</h3>
<p class="legend">From the Snakemake benchmark files (mean over repeats; RSS: the largest).</p>
{timing}
<details><summary>Configuration</summary><pre>{config_json}</pre></details>
</section>"""


# ----------------------------------------------------------------------------- entry point


def build_report(families: dict[str, dict], config: dict, benchmarks: list[Path], out_path: Path) -> None:
    """Write the self-contained cross-family HTML report to out_path (atomically).

    families: name -> {"kind": "causal_lm" | "encoder", "source_precision": str, "sensitivity",
    "plan", "kernel", "eval", "eval_layers": Parquet paths}; config: the whole pipeline config
    (hashed and shown for provenance); benchmarks: Snakemake benchmark TSV files laid out as
    benchmarks/{family}/{rule}.tsv or benchmarks/{rule}.tsv.
    """
    if not families:
        raise ValueError("no families to report on; list at least one under config['families']")
    loaded = []
    for name, spec in families.items():
        log.info("reading family %s", name)
        loaded.append(_load_family(name, spec))
    timings = read_benchmarks(benchmarks, families)
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")

    nav = " ".join(f'<a href="#{_anchor(f.name)}">{html.escape(f.name)}</a>' for f in loaded)
    body = "\n".join(
        [
            _summary_section(loaded, config["layers"]),
            *(_family_section(f) for f in loaded),
            _provenance_section(config, timings, generated),
        ]
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>SOP-PTQ report</title>
<style>{STYLE}</style></head>
<body>
<h1>SOP-PTQ: per-layer codebooks against FP8 E4M3</h1>
<p class="meta">Generated {html.escape(generated)} · config sha256 <code>{config_hash(config)[:12]}</code></p>
<nav><a href="#summary">Summary</a> {nav} <a href="#provenance">Provenance</a></nav>
{body}
</body></html>
"""
    with atomic_path(out_path) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    log.info("wrote %s (%d bytes)", out_path, len(page.encode("utf-8")))
