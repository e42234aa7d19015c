"""Atomic output writing: a later stage never reads a half-written file."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
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


# safetensors' dtype names (the file format's header) -> the torch dtype's attribute name, for
# the dtypes sopq reads and writes (names, not dtypes: this module does not import torch).
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


@contextlib.contextmanager
def safetensors_stream(path, metadata: dict | None = None):
    """Write a safetensors file one tensor at a time: yields add(name, tensor).

    Each tensor's bytes go to a scratch file as they come, so only one tensor is in memory at a
    time; the header, which comes first in the format, is written when the block ends, followed
    by the data, so `metadata` is read then: the caller may fill it in while adding tensors.
    The file appears atomically, only if the block succeeds."""
    import torch

    dtype_names = {getattr(torch, attr): name for name, attr in SAFETENSORS_DTYPES.items()}
    header: dict = {}
    with atomic_path(path) as tmp, open(tmp.with_name(tmp.name + ".data"), "w+b") as data:
        def add(name: str, tensor) -> None:
            if name in header:
                raise ValueError(f"tensor {name!r} written twice to {path}")
            t = tensor.detach().cpu().contiguous()
            start = data.tell()
            data.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            header[name] = {"dtype": dtype_names[t.dtype], "shape": list(t.shape), "data_offsets": [start, data.tell()]}

        yield add
        if metadata:
            header["__metadata__"] = metadata
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            data.seek(0)
            shutil.copyfileobj(data, out, 1 << 24)


def sha256_file(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
