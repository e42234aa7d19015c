"""The quantized variants the evaluate stage compares, measured block by block, and their
per-layer and summary tables."""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from sopq.baselines import BASELINES, EF_BASELINES
from sopq.evaluate import EndToEnd, check_variant_layers, comparable_output, scoring_pieces
from sopq.formats import average_bpw, sop_bpw
from sopq.metrics import LayerErrors
from sopq.model import get_weight, set_weight
from sopq.quantize import MAX_ALTERNATIONS, QuantizedLayer, inverse_cholesky, quantize_layer, without_error_feedback
from sopq.sensitivity import load_fits, option_key, plan_keys, resolve_group, search_options
from sopq.store import PackedReader
from sopq.malloc import HEAP_ONLY
from sopq.stream import BlockWalk
from sopq.workers import run_forked

log = logging.getLogger(__name__)

# Width of the uniform SOP variants, "sop6...": the report measures promotion against them.
UNIFORM_BITS = 6


@dataclass
class LayerInput:
    """One layer's original weight W (N, K) and Gram matrix H: what a variant's layer is made from."""

    W: torch.Tensor
    H: torch.Tensor

    @functools.cached_property
    def hinv(self) -> torch.Tensor:
        # One GPTQ factor for every error-feedback variant of this layer.
        return inverse_cholesky(self.H)


class MadeLayer(NamedTuple):
    """One layer of one variant: W_hat (N, K) float32, its all-in bpw, and its errors
    (LayerErrors' e_out, mse, acos) when they are already known, else None."""

    W_hat: torch.Tensor
    bpw: float
    errors: dict[str, float] | None = None


# A variant is {layer: make}, make(LayerInput) -> MadeLayer: layers are made when their block
# runs, so no variant is ever held whole.


def _quantized(q: QuantizedLayer, errors: dict[str, float] | None = None) -> MadeLayer:
    return MadeLayer(q.dequantize(), sop_bpw(q.bits, q.group, q.scale_format, *q.codes.shape), errors)


def _packed(reader: PackedReader, name: str, _: LayerInput) -> MadeLayer:
    return _quantized(reader.layer(name))


def _stored_fit(fits_dir, name: str, key: str, errors: dict[str, float] | None, _: LayerInput) -> MadeLayer:
    # The sensitivity stage measured this very fit against the same W and H: its errors are reused.
    return _quantized(load_fits(fits_dir, {name: key})[name], errors)


def _stored_without_feedback(fits_dir, name: str, key: str, layer: LayerInput) -> MadeLayer:
    return _quantized(without_error_feedback(layer.W, load_fits(fits_dir, {name: key})[name]))


def _fitted(form: tuple, error_feedback: bool, layer: LayerInput) -> MadeLayer:
    bits, group, scale_format, mode = form
    hinv = layer.hinv if error_feedback else None
    return _quantized(quantize_layer(layer.W, layer.H, bits, group, scale_format, error_feedback, mode,
                                     hinv_chol=hinv, max_alternations=MAX_ALTERNATIONS))


def _rounded(baseline, layer: LayerInput) -> MadeLayer:
    W_hat, bpw = baseline(layer.W)
    return MadeLayer(W_hat.float(), bpw)


def _error_feedback(grid_of, layer: LayerInput) -> MadeLayer:
    grid = grid_of(layer.W)
    return MadeLayer(grid.error_feedback(layer.W, layer.hinv), grid.bpw)


# Estimated cost of one block of one variant in evaluate, in seconds of one core, by how its layers
# are made (qwen2, 24 blocks of 15 M weights, one process): the forward pass ~0.5 for every
# variant; a stored fit (errors known from sensitivity) ~0.1 to load; the packed plan or a
# fixed-format rounding or a stored fit rounded again without error feedback ~0.15 plus ~0.6 for
# the errors' dW H matmuls; error feedback ~0.8 plus the errors; a fit without error feedback
# ~2.2 plus the errors. The layers' GPTQ factor (~1.4) is computed by every worker that has a
# variant needing it.
FORWARD_COST = 0.5
MAKE_COST = {_stored_fit: 0.1, _stored_without_feedback: 0.75, _packed: 0.75, _rounded: 0.75, _error_feedback: 1.4,
             _fitted: 2.8}
ERROR_FEEDBACK_COST = 0.8
FACTOR_COST = 1.4


def _variant_cost(makers: dict) -> tuple[float, bool]:
    """(estimated cost per block, whether it needs the GPTQ factor) of a variant of build_variants."""
    make = next(iter(makers.values()), None)
    kind = getattr(make, "func", None)
    fitted_with_feedback = kind is _fitted and make.args[1]
    cost = FORWARD_COST + MAKE_COST.get(kind, 1.0) + (ERROR_FEEDBACK_COST if fitted_with_feedback else 0.0)
    return cost, kind is _error_feedback or fitted_with_feedback


def deal_variants(variants: dict[str, dict], workers: int) -> list[list[str]]:
    """The variants dealt to at most `workers` parts of near-equal estimated cost: the costliest
    first, each to the part it leaves least loaded. The variants that need the GPTQ factor go
    either together (the factor computed once) or one by one, whichever estimate ends sooner.
    Each part keeps the variants' order."""
    costs = {name: _variant_cost(makers) for name, makers in variants.items()}

    def deal(items):
        parts, loads, has_factor = [[] for _ in range(workers)], [0.0] * workers, [False] * workers
        for cost, names, factor in sorted(items, key=lambda item: -item[0]):
            after = [loads[i] + cost + (FACTOR_COST if factor and not has_factor[i] else 0.0) for i in range(workers)]
            i = after.index(min(after))
            loads[i], has_factor[i] = after[i], has_factor[i] or factor
            parts[i].extend(names)
        return max(loads), parts

    one_by_one = [(cost, [name], factor) for name, (cost, factor) in costs.items()]
    factored = [name for name, (_, factor) in costs.items() if factor]
    together = [item for item in one_by_one if not item[2]]
    if factored:
        together.append((sum(costs[name][0] for name in factored), factored, True))
    _, parts = min(deal(one_by_one), deal(together), key=lambda dealt: dealt[0])
    order = {name: i for i, name in enumerate(variants)}
    return [sorted(part, key=order.get) for part in parts if part]


def budget_variant(budget: float) -> str:
    """Variant name of the plan promoted at `budget`, e.g. sop_promoted@5.5."""
    return f"sop_promoted@{budget:g}"


def build_variants(
    shapes: dict[str, tuple[int, int]],
    packed_dir,
    quantization: dict,
    *,
    fits_dir=None,
    sensitivity: pd.DataFrame | None = None,
    sweep_plans: pd.DataFrame | None = None,
    comparisons: dict | None = None,
) -> dict[str, dict]:
    """{variant: {layer: make}} for the quantizable layers {name: (N, K)} (see LayerInput):
    - sop_promoted, read back from the packed files, so the evaluation checks what was shipped;
    - sop6: every layer at UNIFORM_BITS with the configured group/scale_format/mode, taken from
      the sensitivity stage's fits (fits_dir) when given, else fitted here; with the fits and
      the sensitivity table, also sop6[<option>] for every other option of the search space
      (the errors of stored fits are the sensitivity table's, measured on the same W and H);
    - sop_promoted@B for each budget B in sweep_plans (promote.budget_sweep's stacked plans);
    - sop6_no_ef (comparisons.uniform_without_ef): sop6 without error feedback (from sop6's stored
      fit when fits_dir is given: its codebook before error feedback, its scales);
    - every fixed-format baseline, round to nearest, and (comparisons.ef_baselines) the
      EF_BASELINES through the same error feedback as SOP."""
    comparisons = comparisons or {}
    mode = quantization.get("mode", "free")
    uniform = {
        name: (UNIFORM_BITS, resolve_group(quantization["group"], k), quantization["scale_format"], mode)
        for name, (_, k) in shapes.items()
    }

    measured = {}  # (layer, option key) -> the sensitivity table's errors of that fit
    if sensitivity is not None:
        for row in sensitivity.itertuples():
            measured[row.layer, option_key(row.bits, row.group, row.scale_format, row.mode)] = {
                "e_out": row.e_out, "mse": row.mse, "acos": row.acos}

    def stored(keys: dict[str, str]) -> dict:
        return {name: functools.partial(_stored_fit, fits_dir, name, key, measured.get((name, key)))
                for name, key in keys.items()}

    def fitted(error_feedback: bool) -> dict:
        return {name: functools.partial(_fitted, form, error_feedback) for name, form in uniform.items()}

    reader = PackedReader(packed_dir)
    variants = {"sop_promoted": {name: functools.partial(_packed, reader, name) for name in reader.manifest["layers"]}}
    uniform_keys = {name: option_key(*form) for name, form in uniform.items()}
    variants["sop6"] = stored(uniform_keys) if fits_dir is not None else fitted(quantization["error_feedback"])
    if fits_dir is not None and sensitivity is not None:
        for option in search_options(quantization):
            # By the option, not by the sensitivity table's groups: "row" is a different group per K.
            keys = {name: option_key(UNIFORM_BITS, resolve_group(option.group, k), option.scale_format, option.mode)
                    for name, (_, k) in shapes.items()}
            if keys != uniform_keys and all((name, key) in measured for name, key in keys.items()):
                group = "row" if option.group == "row" else f"g{option.group}"
                variants[f"sop6[{group}.{option.scale_format}.{option.mode}]"] = stored(keys)
    if sweep_plans is not None:
        for budget, plan in sweep_plans.groupby("budget_bpw", sort=True):
            variants[budget_variant(budget)] = stored(plan_keys(plan))
    if comparisons.get("uniform_without_ef"):
        variants["sop6_no_ef"] = fitted(False) if fits_dir is None else {
            name: functools.partial(_stored_without_feedback, fits_dir, name, key) for name, key in uniform_keys.items()}
    for name, baseline in BASELINES.items():
        variants[name] = {layer: functools.partial(_rounded, baseline) for layer in shapes}
    if comparisons.get("ef_baselines"):
        for name, grid_of in EF_BASELINES.items():
            variants[name] = {layer: functools.partial(_error_feedback, grid_of) for layer in shapes}
    return variants


def evaluate_streaming(
    model: nn.Module,
    weights,
    kind: str,
    layers: dict[str, nn.Module],
    gram,
    variants: dict[str, dict],
    sequences: torch.Tensor,
    batch_size: int,
    progress: bool = True,
    workers: int = 1,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-layer table, end-to-end table) of every variant against the reference, for a model
    whose parameters are on the meta device (sopq.model.load_empty_model), one block at a time
    (_evaluate_streaming). With workers > 1 the variants are dealt out (deal_variants) to that
    many forked single-threaded processes (sopq.workers.run_forked), each of which also runs the
    reference; the tables are the same as from one process, in the same order."""
    check_variant_layers(variants, layers)
    names = list(variants)
    parts = deal_variants(variants, workers)
    if len(parts) <= 1:
        return _evaluate_streaming(model, weights, kind, layers, gram, variants, sequences, batch_size, progress)

    def evaluate_part(part: list[str]):
        start, cpu = time.perf_counter(), time.process_time()
        result = _evaluate_streaming(model, weights, kind, layers, gram, {v: variants[v] for v in part}, sequences,
                                     batch_size, progress and part is parts[0])
        # The estimated costs (deal_variants) against what each worker took.
        log.info("worker of %s: %.0f s, %.0f CPU s", ", ".join(part), time.perf_counter() - start, time.process_time() - cpu)
        return result

    results = run_forked(evaluate_part, parts)
    order = {"layer": {name: i for i, name in enumerate(layers)}, "variant": {v: i for i, v in enumerate(["reference", *names])}}

    def by_order(column: pd.Series) -> pd.Series:
        return column.map(order[column.name])

    per_layer = pd.concat([r[0] for r in results]).sort_values(["layer", "variant"], key=by_order)
    # Every part ran the reference: its row is taken once.
    end_to_end = pd.concat([results[0][1], *(r[1].iloc[1:] for r in results[1:])]).sort_values("variant", key=by_order)
    return per_layer.reset_index(drop=True), end_to_end.reset_index(drop=True)


@torch.no_grad()
def _evaluate_streaming(model, weights, kind, layers, gram, variants, sequences, batch_size, progress):
    """evaluate_streaming in this process.

    Block by block (sopq.stream.BlockWalk): the block is read once; the reference and then each
    variant, its layers made from the block's weights and written in, run the block on that
    variant's own hidden states; the original weights go back after each. Then the modules after
    the blocks (final norm, head) turn each variant's last hidden states into the outputs that
    EndToEnd compares. Peak memory: about one block (twice: its weights and their originals) with
    its Gram matrices, one layer of one variant, and every variant's hidden states.

    Per-layer rows (variant, layer, n, k, bpw, e_out, mse, acos), layers outer in the order of
    `layers`; the end-to-end table is evaluate_variants' with the reference first. Both equal
    the whole-model evaluation up to float rounding (tests/test_variants.py).
    """
    check_variant_layers(variants, layers)
    runs = {"reference": {}, **variants}
    scores = EndToEnd(kind, runs)
    rows = {}
    with BlockWalk(model, weights, sequences.split(batch_size), HEAP_ONLY) as walk:
        by_block = walk.layers_by_block(layers)
        hidden = dict.fromkeys(runs, walk.inputs)
        for i, _ in tqdm(walk.blocks(), total=len(by_block), desc="evaluate (blocks)", disable=not progress):
            originals = {name: LayerInput(get_weight(layers[name]).clone(), gram[name]) for name in by_block[i]}
            errors = {}  # LayerErrors per layer, made for the first variant whose errors are not known
            for variant, makers in runs.items():
                try:
                    for name in by_block[i]:
                        if name in makers:
                            made = makers[name](originals[name])
                            measured = made.errors
                            if measured is None:
                                if name not in errors:
                                    errors[name] = LayerErrors(originals[name].W, originals[name].H)
                                measured = errors[name](made.W_hat)
                            n, k = made.W_hat.shape
                            rows[name, variant] = {"variant": variant, "layer": name, "n": n, "k": k, "bpw": made.bpw,
                                                   **measured}
                            set_weight(layers[name], made.W_hat)
                    hidden[variant] = [walk.run(i, b, x) for b, x in enumerate(hidden[variant])]
                finally:
                    for name, layer in originals.items():
                        set_weight(layers[name], layer.W)
        # The head runs on a few sequences at a time: the reference's next-token distributions
        # are prepared once per piece for all variants, and a piece's float64 logits stay small.
        for b, batch in enumerate(walk.batches):
            for piece in scoring_pieces(batch):
                ref = comparable_output(kind, walk.model_output(b, hidden["reference"][b][piece], piece))
                scores.reference(batch[piece], ref)
                for variant in runs:
                    out = ref if variant == "reference" else comparable_output(
                        kind, walk.model_output(b, hidden[variant][b][piece], piece))
                    scores.add(variant, out)
    per_layer = [rows[name, variant] for name in layers for variant in variants if (name, variant) in rows]
    return pd.DataFrame(per_layer), scores.table()


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
