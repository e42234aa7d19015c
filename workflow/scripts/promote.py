"""promote: choose bits per layer under the average-bpw budget (exact MILP)."""
import pandas as pd

from sopq.formats import average_bpw
from sopq.io import write_parquet
from sopq.logs import rule_log
from sopq.promote import promote

with rule_log(snakemake.log[0]) as log:
    plan = promote(pd.read_parquet(snakemake.input[0]), snakemake.params.budget_bpw, snakemake.params.tie_groups)
    log.info("bits chosen: %s; average %.4f bpw", plan["bits"].value_counts().sort_index().to_dict(), average_bpw(plan))
    write_parquet(plan, snakemake.output[0])
