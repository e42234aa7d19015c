"""Snakemake script for fetch_text: params.text -> output.calib and output.eval.

params.text = {package, sha256, calib_files, eval_files}; both outputs are `calib.txt` and
`eval.txt` in one folder (the library writes those names). Runs under Snakemake's `script:`
directive, which injects the `snakemake` object.
"""
import logging
from pathlib import Path

from sopq.fetch import fetch_text

logging.basicConfig(
    filename=snakemake.log[0],  # noqa: F821 (injected by Snakemake)
    level=logging.INFO,
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    force=True,
)
try:
    calib, eval_ = Path(snakemake.output.calib), Path(snakemake.output.eval)  # noqa: F821
    if (calib.name, eval_.name) != ("calib.txt", "eval.txt") or calib.parent != eval_.parent:
        raise ValueError(
            f"fetch_text writes calib.txt and eval.txt in one folder; the rule declares "
            f"{calib} and {eval_}"
        )
    text = snakemake.params.text  # noqa: F821
    fetch_text(
        text["package"],
        text["sha256"],
        list(text["calib_files"]),
        list(text["eval_files"]),
        calib.parent,
    )
except Exception:
    logging.exception("fetch_text failed")
    raise
