import os
import signal

import pytest
import torch
from threadpoolctl import threadpool_info

from sopq.workers import run_forked

SHARED = {"offset": 100}  # set before the fork: children inherit it, nothing is pickled


def add_offset(part):
    # SciPy's OpenBLAS is what the GPTQ factor uses (sopq.quantize.inverse_cholesky).
    blas = [pool["num_threads"] for pool in threadpool_info() if pool["internal_api"] == "openblas"]
    return [x + SHARED["offset"] for x in part], torch.get_num_threads(), blas


def test_run_forked_returns_results_in_order_from_single_threaded_children():
    import scipy.linalg.lapack  # noqa: F401  loads SciPy's OpenBLAS before the fork, as sopq.quantize does

    results = run_forked(add_offset, [[1, 2], [3], [4, 5]])
    assert [r[0] for r in results] == [[101, 102], [103], [104, 105]]
    assert all(r[1] == 1 for r in results)
    assert all(r[2] and set(r[2]) == {1} for r in results)


def fail_on_second(part):
    if part == 2:
        raise ValueError("part 2 is bad: fix it")
    return part


def test_run_forked_raises_a_childs_error_as_is():
    with pytest.raises(ValueError, match="part 2 is bad: fix it"):
        run_forked(fail_on_second, [1, 2, 3])


def killed(part):
    os.kill(os.getpid(), signal.SIGKILL)


def test_run_forked_says_when_a_child_died():
    with pytest.raises(RuntimeError, match="exit code -9.*out of memory"):
        run_forked(killed, [1])
