import itertools

import pandas as pd
import pytest

from sopq.promote import InfeasibleBudget, budget_sweep, promote, tie_group_members


def table(layers):
    """layers: {name: (n*k, alpha, {bits: e_out})} with bpw = bits + 0.5."""
    rows = []
    for name, (size, alpha, errors) in layers.items():
        for bits, e in errors.items():
            rows.append({"layer": name, "bits": bits, "group": 32, "scale_format": "fp16", "n": size, "k": 1,
                         "bpw": bits + 0.5, "e_out": e, "alpha": alpha})
    return pd.DataFrame(rows)


LAYERS = {
    "a.q": (100, 10.0, {4: 0.08, 6: 0.005, 8: 0.0003}),
    "a.k": (300, 1.0, {4: 0.07, 6: 0.004, 8: 0.0002}),
    "b.up": (400, 0.5, {4: 0.09, 6: 0.006, 8: 0.0004}),
    "b.down": (200, 5.0, {4: 0.06, 6: 0.003, 8: 0.0002}),
}


def brute_force(sens, budget):
    best, choice = float("inf"), None
    layers = list(dict.fromkeys(sens["layer"]))
    options = [sens[sens.layer == l].to_dict("records") for l in layers]
    for combo in itertools.product(*options):
        size = sum(r["n"] for r in combo)
        if sum(r["n"] * r["bpw"] for r in combo) <= budget * size + 1e-9:
            cost = sum(r["alpha"] * r["e_out"] for r in combo)
            if cost < best:
                best, choice = cost, [r["bits"] for r in combo]
    return choice


@pytest.mark.parametrize("budget", [4.5, 5.0, 5.7, 6.5, 7.3, 8.5])
def test_milp_matches_brute_force(budget):
    sens = table(LAYERS)
    plan = promote(sens, budget)
    assert plan["layer"].tolist() == list(LAYERS)
    assert plan["bits"].tolist() == brute_force(sens, budget)
    assert (plan["bpw"] * plan["n"]).sum() <= budget * plan["n"].sum() + 1e-9
    assert plan["e_out_pred"].tolist() == [LAYERS[l][2][b] for l, b in zip(plan.layer, plan.bits)]


def test_budget_promotes_the_most_important_layer():
    plan = promote(table(LAYERS), 5.0).set_index("layer")["bits"]
    # 1000 weights at 5.0 bpw allow 1000 extra bits beyond all-4: the small q-layer with the
    # largest alpha takes them, not the big, unimportant up-layer.
    assert plan["a.q"] > plan["b.up"]


def test_infeasible_budget_names_the_smallest_feasible():
    with pytest.raises(InfeasibleBudget, match=r"smallest achievable average is 4\.5000"):
        promote(table(LAYERS), 4.0)


def test_tie_groups_share_bits():
    sens = table(LAYERS)
    assert tie_group_members(list(LAYERS), [["q", "k"]]) == [["a.q", "a.k"]]
    untied = promote(sens, 6.0).set_index("layer")["bits"]
    assert untied["a.q"] != untied["a.k"]
    tied = promote(sens, 6.0, [["q", "k"]]).set_index("layer")["bits"]
    assert tied["a.q"] == tied["a.k"]


def test_options_beyond_bits_and_ties_share_the_whole_option():
    # Two formats at 6 bits: a cheap one (group 128) and a better, dearer one (group 32).
    rows = []
    for layer, alpha in (("m.q", 1.0), ("m.k", 0.01)):
        for bits, group, bpw, e in ((6, 128, 6.125, 0.004), (6, 32, 6.5, 0.002), (8, 32, 8.5, 0.0001)):
            rows.append({"layer": layer, "bits": bits, "group": group, "scale_format": "fp16", "mode": "free",
                         "n": 100, "k": 1, "bpw": bpw, "e_out": e, "alpha": alpha})
    sens = pd.DataFrame(rows)
    plan = promote(sens, 6.3125).set_index("layer")
    assert plan.loc["m.q", "group"] == 32 and plan.loc["m.k", "group"] == 128  # the important layer gets the better format
    tied = promote(sens, 6.3125, [["q", "k"]]).set_index("layer")
    assert tied.loc["m.q", ["bits", "group"]].tolist() == tied.loc["m.k", ["bits", "group"]].tolist() == [6, 128]


def test_budget_sweep_frontier():
    sens = table(LAYERS)
    pareto, plans = budget_sweep(sens, [4.0, 4.5, 5.5, 6.5, 8.5])
    assert pareto["budget_bpw"].tolist() == [4.5, 5.5, 6.5, 8.5]  # 4.0 is below the smallest feasible
    assert pareto["predicted"].is_monotonic_decreasing and (pareto["bpw"] <= pareto["budget_bpw"] + 1e-9).all()
    for row in pareto.itertuples():
        plan = plans[plans["budget_bpw"] == row.budget_bpw]
        assert row.predicted == pytest.approx((plan["alpha"] * plan["e_out_pred"]).sum())
        assert plan["bits"].tolist() == brute_force(sens, row.budget_bpw)
    assert pareto.filter(like="share_b").sum(axis=1).tolist() == pytest.approx([1.0] * 4)
    with pytest.raises(InfeasibleBudget, match="below the smallest feasible average 4.5000"):
        budget_sweep(sens, [3.0, 4.0])
