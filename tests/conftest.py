import os

import pytest
import torch

# Kernel tests run in the Triton interpreter on CPU tensors where no GPU is present; the
# variable must be set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_workflow(tmp_path_factory):
    """The tiny test config through the whole pipeline, run once per session (test_workflow.py)."""
    from test_workflow import run_tiny_workflow

    return run_tiny_workflow(tmp_path_factory.mktemp("workflow"))
