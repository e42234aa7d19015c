"""Run independent parts of one job in forked single-threaded worker processes."""
from __future__ import annotations

import multiprocessing

import torch
from threadpoolctl import threadpool_limits


def use_one_thread() -> None:
    """One thread for torch and for every BLAS and OpenMP library loaded, in a worker process.
    SciPy's OpenBLAS (the GPTQ factor's triangular inverse) otherwise starts a thread per core,
    which spin while the other workers hold the cores: with both cores busy, a 576 x 576 factor
    took 0.1-0.3 s instead of ~10 ms."""
    torch.set_num_threads(1)
    threadpool_limits(1)


def _child(fn, part, send) -> None:
    use_one_thread()
    try:
        send.send(("ok", fn(part)))
    except Exception as error:  # the parent re-raises it, so a ValueError still reads as a user error
        send.send(("error", error))
    finally:
        send.close()


def run_forked(fn, parts: list) -> list:
    """[fn(part) for part in parts], each in its own forked process with one torch thread.

    Many small torch ops (fitting, block-sized matmuls) gain little from a second OpenMP thread
    but fully from a second process. Forked children inherit fn's state (models on the meta
    device, open weight files): only the results are pickled. The first error of any part is
    raised here after the other workers are stopped."""
    context = multiprocessing.get_context("fork")
    running = []
    for part in parts:
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_child, args=(fn, part, send), daemon=True)
        process.start()
        send.close()
        running.append((process, receive))
    finished = False
    try:
        results = []
        for process, receive in running:
            try:
                status, value = receive.recv()  # before join: a large result would fill the pipe
            except EOFError:
                process.join()
                raise RuntimeError(f"a worker process died (exit code {process.exitcode}; -9 is usually the "
                                   "system running out of memory): give the job fewer threads") from None
            if status == "error":
                raise value
            results.append(value)
        finished = True
        return results
    finally:
        for process, _ in running:
            if not finished:
                process.terminate()
            process.join()
