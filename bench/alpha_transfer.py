"""Does alpha, measured with isotropic weight noise, predict the damage of the layer's real fits?

Promotion minimises sum_l alpha_l E_out(l): that assumes a fit's output error hurts the model as
much per unit E_out as the iid noise alpha was measured with. Here each layer's stored fits
(sensitivity's fits/, the default option at the given widths) are put into the model one layer
at a time, and the end-to-end damage D (mean KL per next token, or 1 - cosine of the pooled
embeddings) is measured on the importance stage's calibration sequences (or, with --text eval,
on the evaluate stage's held-out sequences, where the whole plan reproduces the report's number:
a diagnostic, nothing is chosen by it); the table gives
D / (alpha E_out) per layer kind. One forward pass per layer and width (the `noise` method's
cost), so this is a check, not a pipeline stage.

With --plan-budget B, each layer is put in at its width in the sweep's plan at budget B instead,
and the whole plan is measured too: against the sum of its layers' damages alone, that shows
whether the damages add up (promotion assumes they do); FP8 E4M3 per output channel is measured
on the same sequences for comparison (the goal of issue 3 at 5.5 bpw).

    PYTHONPATH=$PWD python bench/alpha_transfer.py --root RUN_DIR --family mpnet \
        (--bits 4,5 | --plan-budget 5.5) [--text calib|eval] [--configfile config.yaml] [--out per_layer.parquet]

RUN_DIR holds the finished run's resources/ and results/ (sensitivity with fits).
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm import tqdm

from sopq.baselines import fp8_per_channel
from sopq.evaluate import _damage_count, _damage_sum, _model_output
from sopq.model import get_weight, load_model, quantizable_layers, set_weight, token_sequences
from sopq.sensitivity import load_fits, option_key

parser = argparse.ArgumentParser()
parser.add_argument("--root", type=Path, required=True)
parser.add_argument("--family", required=True)
which_widths = parser.add_mutually_exclusive_group(required=True)
which_widths.add_argument("--bits", help="comma-separated widths whose fits are put in, each alone")
which_widths.add_argument("--plan-budget", type=float, help="the widths of the sweep's plan at this budget")
parser.add_argument("--text", choices=["calib", "eval"], default="calib")
parser.add_argument("--configfile", type=Path, default=Path("config.yaml"))
parser.add_argument("--out", type=Path, help="also write the per-layer table here (Parquet)")
args = parser.parse_args()

config = yaml.safe_load(args.configfile.read_text())
kind = config["families"][args.family]["kind"]
q = config["quantization"]
results = args.root / "results" / args.family
torch.set_num_threads(1)
model, tokenizer = load_model(args.root / "resources" / "models" / args.family, kind)
layers = quantizable_layers(model, config["layers"]["include"], config["layers"]["exclude"])
n_seq, seq_len = ((config["importance"]["n_seq"], config["calibration"]["seq_len"]) if args.text == "calib"
                  else (config["evaluation"]["n_seq"], config["evaluation"]["seq_len"]))
sequences = token_sequences(tokenizer, (args.root / "resources" / "text" / f"{args.text}.txt").read_text(), n_seq, seq_len)
sensitivity = pd.read_parquet(results / "sensitivity.parquet")
sensitivity = sensitivity[(sensitivity.group == q["group"]) & (sensitivity.scale_format == q["scale_format"])
                          & (sensitivity["mode"] == q["mode"])].set_index(["layer", "bits"])

if args.plan_budget is None:
    widths = {name: [int(b) for b in args.bits.split(",")] for name in layers}
else:
    plans = pd.read_parquet(results / "sweep_plans.parquet")
    plan = plans[plans.budget_bpw == args.plan_budget]
    if plan.empty:
        raise SystemExit(f"no plan at budget {args.plan_budget} in sweep_plans.parquet: "
                         f"its budgets are {sorted(plans.budget_bpw.unique())}")
    if (plan.group != q["group"]).any() or (plan["mode"] != q["mode"]).any():
        raise SystemExit("the plan uses forms other than the config's default option: use --bits")
    widths = {name: [int(b)] for name, b in zip(plan.layer, plan.bits)}

with torch.no_grad():
    reference = _model_output(model, kind, sequences)
logp_reference = reference[:, :-1].float().log_softmax(-1) if kind == "causal_lm" else None


def fitted_weight(name: str, bits: int) -> torch.Tensor:
    key = option_key(bits, q["group"], q["scale_format"], q["mode"])
    return load_fits(results / "fits", {name: key})[name].dequantize()


def damage_with(replaced: dict[str, torch.Tensor]) -> float:
    """Mean damage with these layers' weights replaced, the others as they are."""
    originals = {name: get_weight(layers[name]).clone() for name in replaced}
    try:
        for name, W_hat in replaced.items():
            set_weight(layers[name], W_hat.to(originals[name].dtype))
        with torch.no_grad():
            out = _model_output(model, kind, sequences)
    finally:
        for name, W in originals.items():
            set_weight(layers[name], W)
    return _damage_sum(kind, reference, logp_reference, out) / _damage_count(kind, sequences)


rows = []
for name in tqdm(layers, desc="layers"):
    for b in widths[name]:
        damage = damage_with({name: fitted_weight(name, b)})
        fitted = sensitivity.loc[(name, b)]
        rows.append({"layer": name, "bits": b, "e_out": fitted.e_out, "alpha": fitted.alpha,
                     "predicted": fitted.alpha * fitted.e_out, "measured": damage})

table = pd.DataFrame(rows)
table["ratio"] = table.measured / table.predicted
# The layer's kind: its name without the block index (attention.attn.o, mlp.down_proj, ...).
table["kind"] = [re.sub(r"^.*?\.\d+\.", "", name) for name in table.layer]
if args.out:
    table.to_parquet(args.out)
what = f"widths {args.bits}" if args.plan_budget is None else f"widths of the plan at {args.plan_budget} bpw"
print(f"## {args.family}: measured single-layer damage / (alpha E_out), {len(layers)} layers, {what}, "
      f"{n_seq} x {seq_len} tokens of the {args.text} text\n")
summary = table.groupby(["kind", "bits"]).ratio.describe()[["count", "min", "25%", "50%", "75%", "max"]]
print(summary.to_markdown(floatfmt=".3g"), "\n")
print(f"All layers: median ratio {table.ratio.median():.3g}, std of log ratio {np.log(table.ratio).std():.3g}; "
      f"Spearman rho of predicted against measured {table.predicted.corr(table.measured, method='spearman'):.3f}\n")
print(table.sort_values("ratio").iloc[np.r_[0:4, -4:0]][["layer", "bits", "e_out", "alpha", "measured", "ratio"]]
      .to_markdown(index=False, floatfmt=".3g"))

if args.plan_budget is not None:
    whole = damage_with({name: fitted_weight(name, widths[name][0]) for name in layers})
    print(f"\nThe whole plan at {args.plan_budget} bpw: measured {whole:.4g}; sum of its layers measured alone "
          f"{table.measured.sum():.4g} (whole / sum = {whole / table.measured.sum():.3g}); predicted "
          f"sum alpha E_out {table.predicted.sum():.4g} (whole / predicted = {whole / table.predicted.sum():.3g})")
    fp8 = damage_with({name: fp8_per_channel(get_weight(layers[name]))[0] for name in layers})
    print(f"FP8 E4M3 per output channel, every layer, on the same sequences: {fp8:.4g} "
          f"(plan / FP8 = {whole / fp8:.3g})")
