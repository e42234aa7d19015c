"""sensitivity (merge): the shards' tables concatenated in shard order (which is module order),
and their per-layer fit files hard-linked (copied where the file system cannot) into one folder."""
import os
import shutil
from pathlib import Path

import pandas as pd

from sopq.io import atomic_path, write_parquet
from sopq.logs import rule_log

with rule_log(snakemake.log[0]) as log:
    log.info("merging %d shards", len(snakemake.input.tables))
    with atomic_path(snakemake.output.fits) as tmp:
        tmp.mkdir()
        for part in snakemake.input.fits:
            for path in sorted(Path(part).iterdir()):
                try:
                    os.link(path, tmp / path.name)
                except OSError:
                    shutil.copy2(path, tmp / path.name)
    write_parquet(pd.concat([pd.read_parquet(p) for p in snakemake.input.tables], ignore_index=True), snakemake.output.table)
