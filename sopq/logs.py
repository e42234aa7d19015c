"""Per-rule logging for workflow scripts."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback


def usable_cpus(threads: int) -> int:
    """The job's threads, but no more than the CPUs this process may run on."""
    return max(1, min(threads, len(os.sched_getaffinity(0))))


@contextlib.contextmanager
def rule_log(path: str, threads: int | None = None):
    """Send the script's output (progress bars included) to the rule's log file. A ValueError
    is a problem with the user's input: its message goes to the log and to the terminal as one
    line, and the job fails without a traceback.

    threads: the job's Snakemake threads; torch uses at most the CPUs this process may run on,
    since more OpenMP threads than cores slows every job down."""
    if threads is not None:
        import torch

        torch.set_num_threads(usable_cpus(threads))
    terminal = sys.stderr
    with open(path, "w", buffering=1) as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        logging.basicConfig(stream=log, level=logging.INFO, format="%(asctime)s %(message)s", force=True)
        try:
            yield logging.getLogger("sopq")
        except ValueError as error:
            message = f"error: {error}"
            print(message, file=log)
            print(message, file=terminal)
            raise SystemExit(1) from None
        except Exception:
            traceback.print_exc(file=log)  # an unexpected failure: keep the whole story in the log
            raise
