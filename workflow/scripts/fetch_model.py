"""fetch_model: params.source (a model source spec, see sopq/fetch.py) -> output[0] (an HF folder)."""
from functools import partial
from pathlib import Path

from sopq.fetch import fetch_model
from sopq.logs import rule_log
from sopq.model import convert_gguf

p = snakemake.params
with rule_log(snakemake.log[0], snakemake.threads):
    fetch_model(
        dict(p.source),
        Path(snakemake.output[0]),
        convert_gguf=partial(convert_gguf, kind=p.kind, trust_remote_code=p.trust_remote_code),
    )
