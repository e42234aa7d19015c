"""Snakemake script for fetch_model: params.source (a model source spec) -> output[0] (a folder).

Runs under Snakemake's `script:` directive, which injects the `snakemake` object.
"""
import logging
from pathlib import Path

from sopq.fetch import fetch_model

logging.basicConfig(
    filename=snakemake.log[0],  # noqa: F821 (injected by Snakemake)
    level=logging.INFO,
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    force=True,
)
try:
    fetch_model(dict(snakemake.params.source), Path(snakemake.output[0]))  # noqa: F821
except Exception:
    logging.exception("fetch_model failed")
    raise
