"""Each family's quality table (sopq.variants.quality_table, as in the report) and the alpha check
over the budget sweep, as Markdown, from a finished pipeline run.

    PYTHONPATH=$PWD python bench/quality_tables.py --root RUN_DIR --configfile config/search-space.yaml

RUN_DIR holds the run's results/; the config names the families, their kinds and budget_bpw.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import yaml

from sopq.variants import alpha_validation, quality_table

parser = argparse.ArgumentParser()
parser.add_argument("--root", type=Path, required=True)
parser.add_argument("--configfile", type=Path, required=True)
args = parser.parse_args()

config = yaml.safe_load(args.configfile.read_text())
for family, spec in config["families"].items():
    results = args.root / "results" / family
    summary = pd.read_parquet(results / "eval.parquet")
    table = quality_table(summary, pd.read_parquet(results / "eval_layers.parquet"), spec["kind"])
    print(f"## {family} ({spec['source_precision']})\n")
    print(table.to_markdown(index=False, floatfmt=".4g"), "\n")
    check = alpha_validation(summary, pd.read_parquet(results / "pareto.parquet"), spec["kind"], config["budget_bpw"])
    damage = check.columns[-1]
    print(check.to_markdown(index=False, floatfmt=".4g"), "\n")
    if len(check) >= 3:
        print(f"Pearson r = {check['predicted'].corr(check[damage]):.4f}, Spearman rho = "
              f"{check['predicted'].corr(check[damage], method='spearman'):.3f} over {len(check)} budgets\n")
