"""Atomic output writing: a later stage never reads a half-written file."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; move it into place only if the block succeeds.

    Works for files and directories: the caller writes whatever it likes at the yielded path.
    A process killed mid-write (SIGKILL, a lost node) leaves only its hidden temporary folder,
    never a partial `path`; the next write of `path` removes such leftovers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp = tmp_dir / path.name
    try:
        yield tmp
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _remove_stale_temporaries(path: Path) -> None:
    # mkdtemp's names: the prefix, then 8 characters of [a-z0-9_]. Only one job writes a given
    # output at a time (Snakemake), so any such folder is left over from a killed attempt.
    stale = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}")
    for entry in path.parent.iterdir():
        if entry.is_dir() and stale.fullmatch(entry.name):
            shutil.rmtree(entry, ignore_errors=True)


def write_parquet(df, path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def sha256_file(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
