"""fetch_text: params.text = {package, sha256, calib_files, eval_files} -> output.calib, output.eval."""
from pathlib import Path

from sopq.fetch import fetch_text
from sopq.logs import rule_log

with rule_log(snakemake.log[0]):
    calib, eval_ = Path(snakemake.output.calib), Path(snakemake.output.eval)
    if (calib.name, eval_.name) != ("calib.txt", "eval.txt") or calib.parent != eval_.parent:
        raise ValueError(f"fetch_text writes calib.txt and eval.txt in one folder; the rule declares {calib} and {eval_}")
    text = snakemake.params.text
    fetch_text(text["package"], text["sha256"], list(text["calib_files"]), list(text["eval_files"]), calib.parent)
