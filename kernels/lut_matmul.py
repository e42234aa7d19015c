"""y = x @ W_hat^T straight from the packed codes: Triton lookup-table matmuls.

Every kernel decodes a (BLOCK_N, BLOCK_K) weight tile the same way (_decode_tile): each int32
word of each bit plane (sopq/packing.py) is loaded once, split into its fields by shifts, the
fields are joined into codes, looked up in the codebook and multiplied by their group scale.
W_hat is never held whole in memory.

- _lut_gemv_kernel (M = 1): each program owns BLOCK_N output columns and one K split, and
  reduces x * w on the CUDA cores.
- _lut_mma_kernel (1 < M < PANEL_MIN_M): (BLOCK_M, BLOCK_N) output tiles on the tensor cores
  (one tl.dot per K tile, fp32 accumulation); the decode is shared by BLOCK_M rows of x.
- panel path (M >= PANEL_MIN_M): _lut_dequant_kernel decodes an L2-sized panel of W_hat rows
  into a scratch buffer and torch.matmul (cuBLAS) multiplies it; the decode is shared by all M.
With split_k > 1 the programs add their partial sums into an fp32 buffer with atomics.
lut_matmul picks the kernel and launch configuration from M (launch_config); speeds and where
the time goes: kernels/BENCHMARKS.md.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from sopq.formats import decode_scales, num_groups
from sopq.packing import (
    PLANE_WIDTHS, SUBCHUNK, dequantize, packed_words, plane_chunk, plane_row_words, unpack_codes,
)

# How the kernel reads the stored scales, by their storage dtype.
SCALE_FORMAT_BY_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "e8m0"}
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def scale_format(scales: torch.Tensor) -> str:
    """The scale format of a stored scale tensor, from its dtype."""
    if scales.dtype not in SCALE_FORMAT_BY_DTYPE:
        raise ValueError(
            f"scales dtype {scales.dtype} is not a stored scale format; use float16, bfloat16 or uint8 (e8m0)"
        )
    return SCALE_FORMAT_BY_DTYPE[scales.dtype]


@triton.jit
def _plane_fields(codes_ptr, plane_base, row_words, rows, sub, f, j, K,
                  WIDTH: tl.constexpr, S: tl.constexpr, MASK_K: tl.constexpr):
    """Fields of one bit plane as a (BLOCK_N, C, F, S) tile: entry [n, c, f, j] is the field of
    code S * (sub[c] + f) + j of row rows[n] (sopq/packing.py).

    sub[c] = k0 / S + c * F is a multiple of F, and F divides this plane's 32 / WIDTH fields per
    word, so the F sub-chunks of one c share their S words: each word is loaded once, as a
    (BLOCK_N, C, 1, S) tile, and split into its fields by shifts broadcast over f."""
    PER_WORD: tl.constexpr = 32 // WIDTH
    ptrs = codes_ptr + plane_base + rows * row_words + (sub // PER_WORD) * S + j
    if MASK_K:
        words = tl.load(ptrs, mask=sub * S < K, other=0)
    else:
        words = tl.load(ptrs)
    return (words >> (((sub % PER_WORD) + f) * WIDTH)) & ((1 << WIDTH) - 1)


@triton.jit
def _load_in_place(ptrs, ASM_LOADS: tl.constexpr):
    """tl.load(ptrs) in the register layout of the pointers themselves.

    For the codebook lookup (a data-dependent gather) and the group scales, tl.load would make
    Triton choose a layout of its own for the load and move the whole decoded tile through
    shared memory to get back to the weights' layout, every K tile; an inline-asm load keeps
    the layout. The codebook is tiny, so its loads hit L1. The interpreter cannot run PTX and
    takes tl.load (ASM_LOADS false)."""
    if ASM_LOADS:
        address = ptrs.to(tl.int64)
        ty: tl.constexpr = ptrs.dtype.element_ty
        if ty.primitive_bitwidth == 8:
            bits = tl.inline_asm_elementwise("ld.global.nc.u8 $0, [$1];", "=h,l", [address],
                                             dtype=tl.int16, is_pure=True, pack=1).to(tl.int8)
        elif ty.primitive_bitwidth == 16:
            bits = tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [address],
                                             dtype=tl.int16, is_pure=True, pack=1)
        else:
            bits = tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [address],
                                             dtype=tl.int32, is_pure=True, pack=1)
        return bits.to(ty, bitcast=True)
    else:
        return tl.load(ptrs)


@triton.jit
def _decode_tile(codes_ptr, codebook_ptr, scales_ptr, rows, k0, K, num_groups,
                 row_words0, row_words1, row_words2, plane_base1, plane_base2,
                 W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                 GROUP: tl.constexpr, SCALE_PER_WEIGHT: tl.constexpr, SCALE_IS_E8M0: tl.constexpr,
                 MASK_K: tl.constexpr, ASM_LOADS: tl.constexpr, S: tl.constexpr, C: tl.constexpr, F: tl.constexpr):
    """W_hat[rows, k0 : k0 + C * F * S] in fp32 as a (BLOCK_N, C, F, S) tile whose row-major order
    is the order of k (F = 32 / W0 fields per word of the first plane); exactly 0 past K."""
    c = tl.arange(0, C)[None, :, None, None]
    f = tl.arange(0, F)[None, None, :, None]
    j = tl.arange(0, S)[None, None, None, :]
    n = rows[:, None, None, None]
    sub = k0 // S + c * F
    codes = _plane_fields(codes_ptr, 0, row_words0, n, sub, f, j, K, W0, S, MASK_K)
    if W1 > 0:
        codes |= _plane_fields(codes_ptr, plane_base1, row_words1, n, sub, f, j, K, W1, S, MASK_K) << W0
    if W2 > 0:
        codes |= _plane_fields(codes_ptr, plane_base2, row_words2, n, sub, f, j, K, W2, S, MASK_K) << (W0 + W1)
    k_first = (sub + f) * S  # first k of each sub-chunk, (1, C, F, 1)
    values = _load_in_place(codebook_ptr + codes, ASM_LOADS).to(tl.float32)
    if SCALE_PER_WEIGHT:
        # Groups that are not a multiple of S: one scale per weight.
        group = (k_first + j) // GROUP
    else:
        # The S codes of a sub-chunk lie in one group: one scale per sub-chunk, broadcast over j.
        group = k_first // GROUP
    # Groups past K do not exist: read the row's last one, whose product is discarded below.
    stored = _load_in_place(scales_ptr + n * num_groups + tl.minimum(group, num_groups - 1), ASM_LOADS)
    if SCALE_IS_E8M0:
        w = values * tl.exp2(stored.to(tl.float32) - 127.0)
    else:
        w = values * stored.to(tl.float32)
    if MASK_K:
        # Padding is exactly 0: a NaN codebook entry or an inf scale must not leak into padding
        # (a real NaN must still reach y).
        w = tl.where(k_first + j < K, w, 0.0)
    return w


@triton.jit
def _store_or_add(y_ptr, acc, offs_m, offs_n, M, N, stride_ym, stride_yn, SPLIT_K: tl.constexpr):
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lut_gemv_kernel(
    x_ptr, codes_ptr, codebook_ptr, scales_ptr, y_ptr,
    M, N, K, num_groups, k_per_split,
    row_words0, row_words1, row_words2, plane_base1, plane_base2,
    stride_xm, stride_xk, stride_ym, stride_yn,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    GROUP: tl.constexpr, SCALE_PER_WEIGHT: tl.constexpr, SCALE_IS_E8M0: tl.constexpr, SPLIT_K: tl.constexpr,
    MASK_K: tl.constexpr, ASM_LOADS: tl.constexpr, S: tl.constexpr, F: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One row of x (M = 1, BLOCK_M = 1)."""
    C: tl.constexpr = BLOCK_K // (F * S)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past N read row N - 1 (in bounds, no masks) and are not stored. int64: row offsets
    # times row lengths exceed 2^31 for large layers.
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    # k of each entry of the (BLOCK_N, C, F, S) weight tile, relative to its k0, as a full-shape
    # tensor: each thread loads the x values its weights need (L1 hits), in the weights' own
    # layout (_load_in_place), so neither x nor the tile moves through shared memory.
    k_in_tile = ((tl.arange(0, C)[None, :, None, None] * F + tl.arange(0, F)[None, None, :, None]) * S
                 + tl.arange(0, S)[None, None, None, :] + tl.zeros((BLOCK_N, 1, 1, 1), dtype=tl.int32))
    # Products stay elementwise in the tile's layout and are reduced across threads once, at the end.
    acc = tl.zeros((BLOCK_N, C, F, S), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        w = _decode_tile(codes_ptr, codebook_ptr, scales_ptr, rows, k0, K, num_groups,
                         row_words0, row_words1, row_words2, plane_base1, plane_base2,
                         W0, W1, W2, GROUP, SCALE_PER_WEIGHT, SCALE_IS_E8M0, MASK_K, ASM_LOADS, S, C, F)
        # Past K, read x[K - 1]: its weights are 0 there.
        x = _load_in_place(x_ptr + tl.minimum(k0 + k_in_tile, K - 1) * stride_xk, ASM_LOADS)
        acc += w * x.to(tl.float32)
    y = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)[None, :]
    _store_or_add(y_ptr, y, tl.arange(0, 1), offs_n, M, N, stride_ym, stride_yn, SPLIT_K)


@triton.jit
def _lut_mma_kernel(
    x_ptr, codes_ptr, codebook_ptr, scales_ptr, y_ptr,
    M, N, K, num_groups, k_per_split,
    row_words0, row_words1, row_words2, plane_base1, plane_base2,
    stride_xm, stride_xk, stride_ym, stride_yn,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    GROUP: tl.constexpr, SCALE_PER_WEIGHT: tl.constexpr, SCALE_IS_E8M0: tl.constexpr, SPLIT_K: tl.constexpr,
    MASK_K: tl.constexpr, ASM_LOADS: tl.constexpr, DOT_IN_FP32: tl.constexpr, S: tl.constexpr, F: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    C: tl.constexpr = BLOCK_K // (F * S)
    # Programs that share a weight tile (same pid_n) are adjacent, so its bytes come from L2.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    x_rows = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * stride_xm
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        # The whole (BLOCK_N, BLOCK_K) tile is decoded once and feeds one dot.
        w = _decode_tile(codes_ptr, codebook_ptr, scales_ptr, rows, k0, K, num_groups,
                         row_words0, row_words1, row_words2, plane_base1, plane_base2,
                         W0, W1, W2, GROUP, SCALE_PER_WEIGHT, SCALE_IS_E8M0, MASK_K, ASM_LOADS, S, C, F)
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if MASK_K:
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=(offs_k < K)[None, :], other=0.0)
        else:
            x = tl.load(x_rows + offs_k[None, :] * stride_xk)
        # fp32 activations (and the interpreter, see lut_matmul) get a true fp32 product, not TF32.
        if DOT_IN_FP32 or x.dtype == tl.float32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    _store_or_add(y_ptr, acc, offs_m, offs_n, M, N, stride_ym, stride_yn, SPLIT_K)


@triton.jit
def _lut_dequant_kernel(
    codes_ptr, codebook_ptr, scales_ptr, w_ptr,
    N, K, num_groups, row_words0, row_words1, row_words2, plane_base1, plane_base2, stride_wn,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    GROUP: tl.constexpr, SCALE_PER_WEIGHT: tl.constexpr, SCALE_IS_E8M0: tl.constexpr,
    MASK_K: tl.constexpr, ASM_LOADS: tl.constexpr, S: tl.constexpr, F: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """W_hat[rows, :] into w (N rows of a panel, row stride stride_wn) in w's dtype."""
    C: tl.constexpr = BLOCK_K // (F * S)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    w = _decode_tile(codes_ptr, codebook_ptr, scales_ptr, rows, k0, K, num_groups,
                     row_words0, row_words1, row_words2, plane_base1, plane_base2,
                     W0, W1, W2, GROUP, SCALE_PER_WEIGHT, SCALE_IS_E8M0, MASK_K, ASM_LOADS, S, C, F)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
             tl.reshape(w, (BLOCK_N, BLOCK_K)).to(w_ptr.dtype.element_ty),
             mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


@dataclass(frozen=True)
class LaunchConfig:
    """Which kernel and how it is launched. block_k must be a multiple of tile_k(bits), so every
    K tile starts on a word boundary in every plane.

    "gemv" and "mma" compute y directly; "panel" decodes panel_rows rows of W_hat at a time
    (block_n x block_k tiles) into a scratch buffer of x's dtype, small enough to stay in L2,
    and multiplies each panel with torch.matmul (cuBLAS): W_hat is never held whole."""

    kernel: str  # "gemv", "mma" or "panel"
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    panel_rows: int = 0


# The GEMV kernel takes M = 1; from PANEL_MIN_M on, the panel path (kernels/BENCHMARKS.md).
PANEL_MIN_M = 512
# Bytes of one decoded panel: well inside an H100's 50 MB L2, so cuBLAS reads it from there.
PANEL_BYTES = 16 << 20
# Rows per program in the interpreter: a layer of up to this many rows is one program; larger
# ones (qwen2's 4864-row MLP layers) still take several, with a partial last tile.
INTERPRETED_MAX_BLOCK_N = 4096


def tile_k(bits: int) -> int:
    """The smallest legal block_k for these bits: one word of the first plane for each of S rows'
    worth of sub-chunks, i.e. its chunk (128 codes; 64 at 8 bits)."""
    return plane_chunk(PLANE_WIDTHS[bits][0])


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_config(m: int, n: int, k: int, bits: int, interpreted: bool) -> LaunchConfig:
    """The configuration lut_matmul uses for an (m, k) x (k, n) product."""
    if interpreted:
        # The interpreter pays per program and per op, not per element: few, big tiles. A
        # 4864 x 896 6-bit layer at m = 4 cost 4.6 CPU s in tiles of 256 rows, 0.6 s in one tile.
        block_n = min(max(16, triton.next_power_of_2(n)), INTERPRETED_MAX_BLOCK_N)
        if m == 1:
            return LaunchConfig("gemv", 1, block_n, 256)
        return LaunchConfig("mma", min(max(16, triton.next_power_of_2(m)), 64), block_n, 256)
    sms = _multiprocessors(torch.cuda.current_device())
    if m == 1:
        block_n = 16
        tiles = triton.cdiv(n, block_n)
        # Split K only when there are fewer row tiles than SMs: a split costs two more launches
        # (zeroing and casting the fp32 sums).
        split_k = max(1, min(4, sms // tiles, k // 2048))
        return LaunchConfig("gemv", 1, block_n, 512, split_k, num_warps=4, num_stages=3)
    if m >= PANEL_MIN_M:
        # Sized for 2-byte activations (fp16, bf16); fp32 panels take twice the bytes.
        return LaunchConfig("panel", 0, 64, 256, panel_rows=max(64, PANEL_BYTES // (2 * k) // 64 * 64))
    block_m = min(max(16, triton.next_power_of_2(m)), 128)
    block_n = 64
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = max(1, min(4, (2 * sms) // tiles, k // 1024))
    return LaunchConfig("mma", block_m, block_n, 128, split_k, num_warps=4, num_stages=3)


def lut_matmul(
    x: torch.Tensor,
    words: torch.Tensor,
    codebook: torch.Tensor,
    scales: torch.Tensor,
    *,
    bits: int,
    group: int,
    n: int,
    k: int,
    out: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """y = x @ W_hat^T, (M, N) in x's dtype, from packed codes and stored scales; fp32 accumulation.

    `config` overrides the automatic choice of kernel and blocks (benchmarks and tests use it)."""
    interpreted = isinstance(_lut_mma_kernel, InterpretedFunction)
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must have shape (M, K={k}), got {tuple(x.shape)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"x dtype {x.dtype} unsupported; use one of {ACTIVATION_DTYPES}")
    if words.dtype != torch.int32 or words.dim() != 1 or words.numel() != packed_words(n, k, bits):
        raise ValueError(
            f"words must be 1-D int32 with packed_words({n}, {k}, {bits}) = {packed_words(n, k, bits)} "
            f"entries, got {words.dtype} of shape {tuple(words.shape)}"
        )
    if codebook.dim() != 1 or codebook.numel() != 2**bits:
        raise ValueError(f"codebook must have 2^bits = {2**bits} entries, got shape {tuple(codebook.shape)}")
    scale_format(scales)
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be a positive integer, got {group!r}")
    groups = num_groups(k, group)
    if tuple(scales.shape) != (n, groups):
        raise ValueError(f"scales must have shape ({n}, {groups}) for K={k}, group={group}; got {tuple(scales.shape)}")
    devices = {t.device for t in (x, words, codebook, scales)}
    if len(devices) != 1:
        raise ValueError(f"x, words, codebook and scales must be on one device, got {sorted(map(str, devices))}")
    if x.device.type == "cpu" and not interpreted:
        raise ValueError("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing triton")

    m = x.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must be ({m}, {n}) {x.dtype} on {x.device}, got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()

    config = config or launch_config(m, n, k, bits, interpreted)
    if config.block_k % tile_k(bits):
        raise ValueError(f"block_k must be a multiple of {tile_k(bits)} for {bits}-bit codes, got {config.block_k}")
    # The lookup table is read in its stored precision if that is fp16 (packed layers), else as
    # fp32; the interpreter gets fp32 (see below).
    if interpreted or codebook.dtype != torch.float16:
        codebook = codebook.to(torch.float32)
    widths = PLANE_WIDTHS[bits] + (0,) * (3 - len(PLANE_WIDTHS[bits]))
    row_words = [plane_row_words(k, w) if w else 0 for w in widths]
    plane_base1 = n * row_words[0]
    plane_base2 = plane_base1 + n * row_words[1]
    layout = (*row_words, plane_base1, plane_base2)
    constants = dict(
        W0=widths[0], W1=widths[1], W2=widths[2], GROUP=group,
        SCALE_PER_WEIGHT=not (group % SUBCHUNK == 0 or group >= k), SCALE_IS_E8M0=scales.dtype == torch.uint8,
        MASK_K=k % config.block_k != 0, ASM_LOADS=not interpreted, S=SUBCHUNK, F=32 // widths[0],
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    codebook, scales = codebook.contiguous(), scales.contiguous()
    if config.kernel == "panel":
        if config.panel_rows < 1:
            raise ValueError(f"the panel path needs panel_rows >= 1, got {config.panel_rows}")
        panel = torch.empty(min(config.panel_rows, n), k, dtype=x.dtype, device=x.device)
        for n0 in range(0, n, panel.shape[0]):
            rows = min(panel.shape[0], n - n0)
            # Row n0 of every plane and of the scales: the panel is a layer of `rows` rows.
            _lut_dequant_kernel[(triton.cdiv(rows, config.block_n), triton.cdiv(k, config.block_k))](
                words[n0 * row_words[0]:], codebook, scales[n0:], panel,
                rows, k, groups, row_words[0], row_words[1], row_words[2],
                plane_base1 - n0 * row_words[0] + n0 * row_words[1] if widths[1] else 0,
                plane_base2 - n0 * row_words[0] + n0 * row_words[2] if widths[2] else 0,
                panel.stride(0), **constants)
            torch.matmul(x, panel[:rows].T, out=out[:, n0:n0 + rows])
        return out
    # The interpreter mishandles bfloat16: its tl.dot multiplies the raw bit patterns
    # (triton-lang/triton#11584) and its fp32 -> bf16 cast truncates. So there the kernel
    # computes and stores in fp32, and torch rounds the result into `out`. Split-K programs
    # add into fp32 too.
    if config.split_k > 1:
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    elif interpreted:
        y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    else:
        y = out
    # Each split covers whole BLOCK_K tiles.
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
    args = (x, words, codebook, scales, y, m, n, k, groups, k_per_split, *layout,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1))
    constants.update(SPLIT_K=config.split_k, BLOCK_M=config.block_m)
    splits = triton.cdiv(k, k_per_split)
    if config.kernel == "gemv":
        if m != 1 or config.block_m != 1:
            raise ValueError(f"the gemv kernel takes one row of x (M = 1, block_m = 1), got M = {m}, block_m = {config.block_m}")
        _lut_gemv_kernel[(triton.cdiv(n, config.block_n), splits)](*args, **constants)
    elif config.kernel == "mma":
        if min(config.block_m, config.block_n) < 16:
            raise ValueError("the mma kernel needs block_m and block_n >= 16 (tl.dot)")
        grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), splits)
        _lut_mma_kernel[grid](*args, DOT_IN_FP32=interpreted, **constants)
    else:
        raise ValueError(f"config.kernel must be 'gemv', 'mma' or 'panel', got {config.kernel!r}")
    if y is not out:
        out.copy_(y)
    return out


def reference_lut_matmul(
    x: torch.Tensor,
    words: torch.Tensor,
    codebook: torch.Tensor,
    scales: torch.Tensor,
    *,
    bits: int,
    group: int,
    n: int,
    k: int,
) -> torch.Tensor:
    """The same product in float64 on the CPU via unpack_codes + dequantize: what lut_matmul must match."""
    codes = unpack_codes(words.cpu(), bits, (n, k))
    decoded = decode_scales(scales.cpu(), scale_format(scales))
    w_hat = dequantize(codes, codebook.cpu(), decoded, group)
    return x.cpu().double() @ w_hat.double().T
