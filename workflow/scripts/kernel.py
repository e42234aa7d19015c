"""kernel: run every packed layer through the Triton LUT matmul and compare with the reference."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

from sopq.io import write_parquet  # noqa: E402
from sopq.kernel_check import check_packed_layers  # noqa: E402
from sopq.logs import rule_log  # noqa: E402

with rule_log(snakemake.log[0], snakemake.threads):
    table = check_packed_layers(snakemake.input[0], m=snakemake.params.m, seed=snakemake.params.seed)
    write_parquet(table, snakemake.output[0])
