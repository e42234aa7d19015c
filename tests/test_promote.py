import itertools

import pandas as pd
import pytest

from sopq.promote import InfeasibleBudget, promote, tie_group_members


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
