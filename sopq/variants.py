"""The quantized variants the evaluate stage compares, and their per-layer and summary tables."""
from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import torch

from sopq.baselines import BASELINES, EF_BASELINES
from sopq.formats import average_bpw, sop_bpw
from sopq.metrics import layer_errors_many
from sopq.quantize import inverse_cholesky
from sopq.sensitivity import GramLookup, _map_layers, fit_layers, load_fits, option_key, plan_keys, resolve_group
from sopq.store import read_packed

# Width of the uniform SOP variants, "sop6...": the report measures promotion against them.
UNIFORM_BITS = 6


def materialize(W_hat) -> torch.Tensor:
    """A variant's layer weight: build_variants gives SOP layers and round-to-nearest baselines as
    callables (codes take 1 byte per weight, not 4; rounding is cheap to redo), the rest as tensors."""
    return W_hat() if callable(W_hat) else W_hat


def _rounded(baseline, W) -> torch.Tensor:
    return baseline(W)[0].float()


def _sop_variant(fitted) -> tuple[dict, dict]:
    weights = {name: q.dequantize for name, q in fitted.items()}
    bpw = {name: sop_bpw(q.bits, q.group, q.scale_format, *q.codes.shape) for name, q in fitted.items()}
    return weights, bpw


def budget_variant(budget: float) -> str:
    """Variant name of the plan promoted at `budget`, e.g. sop_promoted@5.5."""
    return f"sop_promoted@{budget:g}"


def _ef_baselines(W, H) -> dict[str, tuple[torch.Tensor, float]]:
    hinv = inverse_cholesky(H)  # one factor for every fixed format of this layer
    out = {}
    for name, grid_of in EF_BASELINES.items():
        grid = grid_of(W)
        out[name] = (grid.error_feedback(W, hinv), grid.bpw)
    return out


def build_variants(
    weights: dict[str, torch.Tensor],
    gram: GramLookup,
    packed_dir,
    quantization: dict,
    workers: int = 1,
    *,
    fits_dir=None,
    sensitivity: pd.DataFrame | None = None,
    sweep_plans: pd.DataFrame | None = None,
    comparisons: dict | None = None,
):
    """{variant: {layer: W_hat or a callable making it (see materialize)}} and {variant: {layer:
    all-in bpw}}:
    - sop_promoted, read back from the packed files, so the evaluation checks what was shipped;
    - sop6: every layer at UNIFORM_BITS with the configured group/scale_format/mode, taken from
      the sensitivity stage's fits (fits_dir) when given, else fitted here; with the fits and
      the sensitivity table, also sop6[<option>] for every other option of the search space;
    - sop_promoted@B for each budget B in sweep_plans (promote.budget_sweep's stacked plans);
    - sop6_no_ef (comparisons.uniform_without_ef): sop6 without error feedback;
    - every fixed-format baseline, round to nearest, and (comparisons.ef_baselines) the
      EF_BASELINES through the same error feedback as SOP."""
    comparisons = comparisons or {}
    mode = quantization.get("mode", "free")
    variants, bpw = {}, {}
    variants["sop_promoted"], bpw["sop_promoted"] = _sop_variant(read_packed(packed_dir))
    uniform = {
        name: (UNIFORM_BITS, resolve_group(quantization["group"], W.shape[1]), quantization["scale_format"], mode)
        for name, W in weights.items()
    }
    if fits_dir is not None:
        sop6 = load_fits(fits_dir, {name: option_key(*form) for name, form in uniform.items()})
    else:
        sop6 = fit_layers(weights, gram, uniform, quantization["error_feedback"], "sop6", workers)
    variants["sop6"], bpw["sop6"] = _sop_variant(sop6)
    if fits_dir is not None and sensitivity is not None:
        rows = sensitivity[sensitivity["bits"] == UNIFORM_BITS]
        for (group, fmt, m), part in rows.groupby(["group", "scale_format", "mode"], sort=False):
            keys = {row.layer: option_key(row.bits, row.group, row.scale_format, row.mode) for row in part.itertuples()}
            name = f"sop6[g{group}.{fmt}.{m}]"
            if set(keys) == set(weights) and keys != {n: option_key(*f) for n, f in uniform.items()}:
                variants[name], bpw[name] = _sop_variant(load_fits(fits_dir, keys))
    if sweep_plans is not None:
        for budget, plan in sweep_plans.groupby("budget_bpw", sort=True):
            variants[budget_variant(budget)], bpw[budget_variant(budget)] = _sop_variant(load_fits(fits_dir, plan_keys(plan)))
    if comparisons.get("uniform_without_ef"):
        plain = fit_layers(weights, gram, uniform, False, "sop6 without error feedback", workers)
        variants["sop6_no_ef"], bpw["sop6_no_ef"] = _sop_variant(plain)
    for name, baseline in BASELINES.items():
        variants[name] = {layer: functools.partial(_rounded, baseline, W) for layer, W in weights.items()}
        bpw[name] = {layer: baseline(W)[1] for layer, W in weights.items()}
    if comparisons.get("ef_baselines"):
        tasks = ((W, gram[layer]) for layer, W in weights.items())
        per_layer = dict(zip(weights, _map_layers(_ef_baselines, tasks, workers, "baselines with error feedback", len(weights))))
        for name in EF_BASELINES:
            variants[name] = {layer: per_layer[layer][name][0] for layer in weights}
            bpw[name] = {layer: per_layer[layer][name][1] for layer in weights}
    return variants, bpw


def layer_table(weights, gram: GramLookup, variants: dict, bpw: dict) -> pd.DataFrame:
    """One row per (variant, layer): n, k, bpw, e_out, mse, acos. Layers outer so each Gram
    matrix is loaded once."""
    rows = []
    for layer, W in weights.items():
        hats = {variant: materialize(quantized[layer]) for variant, quantized in variants.items()}
        errors = layer_errors_many(W, hats, gram[layer])
        for variant in variants:
            rows.append({"variant": variant, "layer": layer, "n": W.shape[0], "k": W.shape[1],
                         "bpw": bpw[variant][layer], **errors[variant]})
    return pd.DataFrame(rows)


def summarize(per_layer: pd.DataFrame, end_to_end: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: all-in bpw averaged over weights, E_out median/p95/max, end-to-end metrics."""
    def stats(g: pd.DataFrame) -> pd.Series:
        return pd.Series({
            "bpw": average_bpw(g),
            "e_out_median": g["e_out"].median(),
            "e_out_p95": g["e_out"].quantile(0.95),
            "e_out_max": g["e_out"].max(),
        })

    summary = per_layer.groupby("variant", sort=False)[["n", "k", "bpw", "e_out"]].apply(stats).reset_index()
    reference = pd.DataFrame([{"variant": "reference", "bpw": np.nan}])
    return pd.concat([reference, summary], ignore_index=True).merge(end_to_end, on="variant", how="left")


# End-to-end damage per model kind: larger is worse for both (KL; 1 - embedding cosine).
DAMAGE = {"causal_lm": ("kl_mean", lambda t: t["kl_mean"]), "encoder": ("1-cosine", lambda t: 1 - t["cosine_mean"])}


def uses_error_feedback(variant: str) -> bool:
    """SOP variants use error feedback except sop6_no_ef; fixed formats only as their _ef forms."""
    if variant.endswith("_no_ef"):
        return False
    return variant.endswith("_ef") or variant.startswith("sop")


def quality_table(summary: pd.DataFrame, per_layer: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The per-family comparison: one row per variant (the evaluate stage's outputs) with all-in
    bpw, E_out median/p95/worst over layers, the median over layers of E_out / E_out(FP8 E4M3 per
    channel, round to nearest), the share of layers where the variant's E_out is lower than that,
    whether error feedback was used, and the end-to-end damage (KL for causal LMs, 1 - cosine of
    pooled embeddings for encoders)."""
    fp8 = per_layer.loc[per_layer["variant"] == "fp8_channel"].set_index("layer")["e_out"]
    ratio = per_layer.assign(ratio=per_layer["e_out"] / per_layer["layer"].map(fp8))
    vs_fp8 = ratio.groupby("variant", sort=False)["ratio"].agg(
        ratio_to_fp8_median="median", layers_beating_fp8=lambda r: float((r < 1).mean())
    )
    name, damage = DAMAGE[kind]
    table = summary.loc[summary["variant"] != "reference"].set_index("variant")
    out = table[["bpw", "e_out_median", "e_out_p95", "e_out_max"]].join(vs_fp8)
    out.insert(0, "error_feedback", [uses_error_feedback(v) for v in out.index])
    out[name] = damage(table)
    return out.reset_index().sort_values(["bpw", "variant"], ignore_index=True)


def alpha_validation(summary: pd.DataFrame, pareto: pd.DataFrame, kind: str, promoted_budget: float | None = None) -> pd.DataFrame:
    """Predicted sum_l alpha_l E_out(l) of each promoted plan of the sweep next to the measured
    end-to-end damage of the same plan (variants sop_promoted@B, and sop_promoted for the plan
    at promoted_budget); empty if none was measured."""
    name, damage = DAMAGE[kind]
    measured = summary.assign(damage=damage(summary)).set_index("variant")["damage"]

    def variant(budget):
        return "sop_promoted" if promoted_budget is not None and budget == promoted_budget else budget_variant(budget)

    rows = [
        {"budget_bpw": r.budget_bpw, "bpw": r.bpw, "predicted": r.predicted, name: measured[variant(r.budget_bpw)]}
        for r in pareto.itertuples()
        if variant(r.budget_bpw) in measured.index
    ]
    return pd.DataFrame(rows, columns=["budget_bpw", "bpw", "predicted", name])
