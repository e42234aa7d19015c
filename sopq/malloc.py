"""glibc allocator settings for stages that allocate and free large tensors over and over."""
from __future__ import annotations


def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


# Allocation size from which glibc serves memory with its own map (see set_malloc_maps).
# 64 KiB keeps calibration's memory flat with depth. Stages that fit or compare layers
# (sensitivity, evaluate, importance) take HEAP_ONLY: every allocation from the heap (the block
# walks hand its free memory back after each block, trim_heap). Their layers' temporaries (tens of MB on
# qwen2), each mapped fresh, cost more system time in page faults than their arithmetic, at some
# more peak memory (bench/RESULTS-pipeline.md): qwen2 evaluate of 3 blocks in one process took
# 48 s of system time (183 s wall) with an 8 MiB threshold, 8 s (143 s wall) heap-only, at
# 5.5 GB peak RSS instead of 4.3; sensitivity of 4 qwen2 layers 26.3 -> 22.0 s, 2.0 -> 2.6 GB.
FLAT_MMAP_THRESHOLD = 1 << 16
HEAP_ONLY = None


def set_malloc_maps(threshold: int | None) -> None:
    """Serve every allocation of `threshold` bytes or more with its own memory map (glibc), so
    a freed block's weights and statistics go back to the system at once; None: no memory maps.
    By default glibc raises the threshold after the first large free, and later blocks' tensors
    land on a heap that frees nothing: measured, peak memory then grows with depth
    (bench/RESULTS-streaming.md)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        M_MMAP_THRESHOLD, M_MMAP_MAX = -3, -4
        libc.mallopt(M_MMAP_MAX, 0 if threshold is None else 65536)  # 65536: glibc's default
        if threshold is not None:
            libc.mallopt(M_MMAP_THRESHOLD, threshold)


def trim_heap() -> None:
    """Hand the heap's free memory back to the system (glibc malloc_trim) after a block."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
