"""Format allocation across layers: minimise predicted model error under an average-bpw budget.

Choose an option o_l per layer (bits, and where the search space has several: group size, scale
format, codebook mode) to minimise sum_l alpha_l * E_out(l, o_l) subject to
sum_l n_l * bpw(l, o_l) <= budget * sum_l n_l, solved exactly as a MILP with one binary
variable per (layer, option). Tie groups force layers to share their option (e.g. q/k/v).
A sweep over budgets gives the Pareto frontier of predicted error against bits.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix


class InfeasibleBudget(ValueError):
    pass


def tie_group_members(layers: list[str], tie_groups: list[list[str]]) -> list[list[str]]:
    """Layers that must share bits: within one parent module, those whose last name component
    matches a pattern of the same tie group (e.g. [q_proj, k_proj, v_proj])."""
    tied = []
    for patterns in tie_groups:
        by_parent: dict[str, list[str]] = {}
        for layer in layers:
            parent, _, leaf = layer.rpartition(".")
            if any(re.fullmatch(p, leaf) for p in patterns):
                by_parent.setdefault(parent, []).append(layer)
        tied.extend(members for members in by_parent.values() if len(members) > 1)
    return tied


def promote(sensitivity: pd.DataFrame, budget_bpw: float, tie_groups: list[list[str]] = ()) -> pd.DataFrame:
    """sensitivity: one row per (layer, option) with columns layer, bits, group, scale_format,
    [mode,] n, k, bpw, e_out, alpha. Returns one row per layer (in first-seen order) with the
    chosen option and e_out_pred."""
    table = sensitivity.reset_index(drop=True)
    if "mode" not in table:
        table = table.assign(mode="free")
    option_columns = ["bits", "group", "scale_format", "mode"]
    options = list(table[option_columns].itertuples(index=False, name=None))
    layers = list(dict.fromkeys(table["layer"]))
    weights = (table["n"] * table["k"]).to_numpy(dtype=float)
    total_weights = (
        table.drop_duplicates("layer").set_index("layer").loc[layers].eval("n * k").sum()
    )
    smallest = smallest_budget(table)
    if budget_bpw < smallest - 1e-12:
        raise InfeasibleBudget(
            f"budget_bpw={budget_bpw} is infeasible: the smallest achievable average is "
            f"{smallest:.4f} bits per weight with the allowed bits; raise budget_bpw to at least that"
        )
    cost = (table["alpha"] * table["e_out"]).to_numpy(dtype=float)
    if not np.isfinite(cost).all():
        bad = table.loc[~np.isfinite(cost), "layer"].unique()[:3]
        raise ValueError(f"non-finite alpha * e_out for layers {list(bad)}; check the sensitivity table")
    n_var = len(table)
    row_of = {layer: i for i, layer in enumerate(layers)}
    ties = tie_group_members(layers, tie_groups)
    distinct_options = list(dict.fromkeys(options))
    n_tie_rows = sum(len(m) - 1 for m in ties) * len(distinct_options)
    A = lil_matrix((len(layers) + 1 + n_tie_rows, n_var))
    for var, layer in enumerate(table["layer"]):
        A[row_of[layer], var] = 1  # exactly one option per layer
    A[len(layers), :] = weights * table["bpw"].to_numpy()  # the budget
    lo = np.r_[np.ones(len(layers)), -np.inf]
    hi = np.r_[np.ones(len(layers)), budget_bpw * total_weights]
    row = len(layers) + 1
    index = {(l, o): v for v, (l, o) in enumerate(zip(table["layer"], options))}
    for members in ties:
        for other in members[1:]:
            for option in distinct_options:
                # x[first, o] - x[other, o] == 0; an option missing on one side is forbidden.
                if (members[0], option) in index:
                    A[row, index[members[0], option]] = 1
                if (other, option) in index:
                    A[row, index[other, option]] = -1
                row += 1
    lo = np.r_[lo, np.zeros(row - len(layers) - 1)]
    hi = np.r_[hi, np.zeros(row - len(layers) - 1)]
    result = milp(
        cost,
        constraints=LinearConstraint(A[:row].tocsr(), lo, hi),
        integrality=np.ones(n_var),
        bounds=Bounds(0, 1),
    )
    if result.status == 2:  # the budget alone is feasible (checked above), so the ties make it infeasible
        raise InfeasibleBudget(
            f"no bit allocation meets budget_bpw={budget_bpw} with the tie groups {list(tie_groups)}; "
            f"raise budget_bpw or remove tie groups"
        )
    if result.status != 0:
        raise RuntimeError(f"the MILP solver stopped without an optimal plan: {result.message}")
    chosen = table.loc[result.x > 0.5].set_index("layer").loc[layers].reset_index()
    chosen["e_out_pred"] = chosen["e_out"]
    chosen["budget_bpw"] = budget_bpw
    return chosen[["layer", "bits", "group", "scale_format", "mode", "n", "k", "bpw", "e_out_pred", "alpha", "budget_bpw"]]


def smallest_budget(sensitivity: pd.DataFrame) -> float:
    """The smallest average all-in bpw any plan reaches (every layer at its cheapest option)."""
    per_layer = sensitivity.assign(nb=sensitivity["n"] * sensitivity["k"] * sensitivity["bpw"]).groupby("layer")
    sizes = sensitivity.drop_duplicates("layer").set_index("layer").eval("n * k")
    return float(per_layer["nb"].min().sum() / sizes.sum())


def budget_sweep(sensitivity: pd.DataFrame, budgets, tie_groups=()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Promote at each budget (those below the smallest feasible one are skipped). Returns the
    Pareto table, one row per budget (budget_bpw, bpw reached, predicted sum alpha E_out,
    E_out median/p95/max over layers, share of weights at each width) and every plan stacked."""
    floor = smallest_budget(sensitivity)
    rows, plans = [], []
    for budget in sorted(budgets):
        if budget < floor - 1e-12:
            continue
        plan = promote(sensitivity, budget, tie_groups)
        sizes = plan["n"] * plan["k"]
        row = {"budget_bpw": budget, "bpw": float((sizes * plan["bpw"]).sum() / sizes.sum()),
               "predicted": float((plan["alpha"] * plan["e_out_pred"]).sum()),
               "e_out_median": plan["e_out_pred"].median(), "e_out_p95": plan["e_out_pred"].quantile(0.95),
               "e_out_max": plan["e_out_pred"].max()}
        for bits, share in (sizes.groupby(plan["bits"]).sum() / sizes.sum()).items():
            row[f"share_b{bits}"] = float(share)
        rows.append(row)
        plans.append(plan)
    if not rows:
        raise InfeasibleBudget(f"every budget in {sorted(budgets)} is below the smallest feasible average {floor:.4f} bpw")
    return pd.DataFrame(rows).fillna({c: 0.0 for c in pd.DataFrame(rows).columns if c.startswith("share_")}), pd.concat(plans, ignore_index=True)
