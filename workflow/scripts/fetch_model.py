"""fetch_model: params.source (a model source spec, see sopq/fetch.py) -> output[0] (a folder)."""
from pathlib import Path

from sopq.fetch import fetch_model
from sopq.logs import rule_log

with rule_log(snakemake.log[0]):
    fetch_model(dict(snakemake.params.source), Path(snakemake.output[0]))
