"""sweep: promotion at every budget of the sweep; the Pareto frontier and the plans."""
import pandas as pd

from sopq.io import write_parquet
from sopq.logs import rule_log
from sopq.promote import budget_sweep

with rule_log(snakemake.log[0]) as log:
    pareto, plans = budget_sweep(pd.read_parquet(snakemake.input[0]), snakemake.params.budgets, snakemake.params.tie_groups)
    log.info("Pareto frontier:\n%s", pareto.to_string(index=False))
    write_parquet(pareto, snakemake.output.pareto)
    write_parquet(plans, snakemake.output.plans)
