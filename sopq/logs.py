"""Per-rule logging for workflow scripts."""
from __future__ import annotations

import contextlib
import logging
import sys


@contextlib.contextmanager
def rule_log(path: str):
    """Send the script's output (progress bars included) to the rule's log file. A ValueError
    is a problem with the user's input: its message goes to the log and to the terminal as one
    line, and the job fails without a traceback."""
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
