"""y = x @ W_hat^T straight from the packed codes: Triton lookup-table matmuls.

Every kernel decodes a (BLOCK_N, BLOCK_K) weight tile the same way: each int32 word of each bit
plane (sopq/packing.py) is loaded once (the next K tile's words while this one is decoded),
split into its fields by constant shifts, the fields are joined into codes and looked up in the
codebook, which tl.gather reads from shared memory. Group scales multiply either each weight or,
where a whole K tile lies in one group, the tile's product. W_hat is never held whole in memory.

- _lut_mma_kernel (M < PANEL_MIN_M, M = 1 included): (BLOCK_M, BLOCK_N) output tiles on the
  tensor cores (one tl.dot per K tile, fp32 accumulation); the decode is shared by BLOCK_M rows
  of x. At M = 1 the 15 padding rows of the smallest tile cost little next to the decode.
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
def _plane_words(codes_ptr, plane_base, row_words, n, k0, limit,
                 WIDTH: tl.constexpr, S: tl.constexpr, C: tl.constexpr, F: tl.constexpr):
    """The words of one bit plane that hold the codes of K tile k0 (C chunks of F * S codes) of
    rows n, as a (BLOCK_N, C, 1, S) tile; chunks from `limit` on read 0.

    k0 is a multiple of F * S and F divides this plane's 32 / WIDTH fields per word, so the F
    sub-chunks of one chunk share their S words (sopq/packing.py): each word is loaded once. The
    part of the fields' bit offset that depends on k0 is shifted out here, once per word, so
    that _fields shifts by compile-time constants."""
    PER_WORD: tl.constexpr = 32 // WIDTH
    c = tl.arange(0, C)[None, :, None, None]
    sub = k0 // S + c * F
    words = tl.load(codes_ptr + plane_base + n * row_words + (sub // PER_WORD) * S + tl.arange(0, S)[None, None, None, :],
                    mask=sub * S < limit, other=0)
    if PER_WORD > F:
        words = words >> (((k0 // S) % PER_WORD) * WIDTH)
    return words


@triton.jit
def _fields(words, WIDTH: tl.constexpr, C: tl.constexpr, F: tl.constexpr):
    """(BLOCK_N, C, F, S) fields of a (BLOCK_N, C, 1, S) tile of _plane_words: entry [n, c, f, j]
    belongs to code (c * F + f) * S + j of the K tile. c and f index registers, so every shift
    is a constant."""
    PER_WORD: tl.constexpr = 32 // WIDTH
    c = tl.arange(0, C)[None, :, None, None]
    f = tl.arange(0, F)[None, None, :, None]
    return (words >> (((c * F) % PER_WORD + f) * WIDTH)) & ((1 << WIDTH) - 1)


@triton.jit
def _tile_words(codes_ptr, n, k0, limit, row_words0, row_words1, row_words2, plane_base1, plane_base2,
                W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, S: tl.constexpr, C: tl.constexpr,
                F: tl.constexpr):
    """Every plane's _plane_words for K tile k0; an absent plane repeats the first one (unused)."""
    words0 = _plane_words(codes_ptr, 0, row_words0, n, k0, limit, W0, S, C, F)
    words1 = words0
    words2 = words0
    if W1 > 0:
        words1 = _plane_words(codes_ptr, plane_base1, row_words1, n, k0, limit, W1, S, C, F)
    if W2 > 0:
        words2 = _plane_words(codes_ptr, plane_base2, row_words2, n, k0, limit, W2, S, C, F)
    return words0, words1, words2


@triton.jit
def _load_in_place(ptrs, ASM_LOADS: tl.constexpr):
    """tl.load(ptrs) in the register layout of the pointers themselves.

    For the group scales, tl.load would make Triton choose a layout of its own for the load and
    move it through shared memory to get back to the weights' layout; an inline-asm load keeps
    the layout. The interpreter cannot run PTX and takes tl.load (ASM_LOADS false)."""
    if ASM_LOADS:
        address = ptrs.to(tl.int64)
        ty: tl.constexpr = ptrs.dtype.element_ty
        if ty.primitive_bitwidth == 8:
            bits = tl.inline_asm_elementwise("ld.global.nc.u8 $0, [$1];", "=h,l", [address],
                                             dtype=tl.int16, is_pure=True, pack=1).to(tl.int8)
        else:
            bits = tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [address],
                                             dtype=tl.int16, is_pure=True, pack=1)
        return bits.to(ty, bitcast=True)
    else:
        return tl.load(ptrs)


@triton.jit
def _lookup(codebook, words0, words1, words2, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
            C: tl.constexpr, F: tl.constexpr):
    """codebook[code] for every code of a K tile, (BLOCK_N, C, F, S) fp32.

    The codebook sits in registers (loaded once per program); tl.gather copies it to shared
    memory and reads one entry per code from there: one shared load at a 32-bit address, where
    a load from global memory (L1) needed a 64-bit one, and Triton keeps the codes' layout."""
    codes = _fields(words0, W0, C, F)
    if W1 > 0:
        codes |= _fields(words1, W1, C, F) << W0
    if W2 > 0:
        codes |= _fields(words2, W2, C, F) << (W0 + W1)
    return tl.reshape(tl.gather(codebook, tl.reshape(codes, (codes.numel,)), 0), codes.shape)


@triton.jit
def _scales(scales_ptr, n, k0, num_groups, GROUP: tl.constexpr, SCALE_MODE: tl.constexpr,
            SCALE_IS_E8M0: tl.constexpr, ASM_LOADS: tl.constexpr, S: tl.constexpr, C: tl.constexpr,
            F: tl.constexpr):
    """fp32 group scales of the K tile at k0 for rows n: one per row, in the shape of n, when the
    whole tile lies in one group (SCALE_MODE 3); else broadcastable to the tile's (BLOCK_N, C, F, S)
    shape: (BLOCK_N, C, 1, 1) when every chunk of F * S codes lies in one group (2),
    (BLOCK_N, C, F, 1) when every sub-chunk of S codes does (1), else one per weight (0).
    Groups past K read the row's last one; their products are discarded."""
    k_chunk = k0 + tl.arange(0, C)[None, :, None, None] * (F * S)
    if SCALE_MODE == 3:
        k = k0
    elif SCALE_MODE >= 2:
        k = k_chunk
    elif SCALE_MODE == 1:
        k = k_chunk + tl.arange(0, F)[None, None, :, None] * S
    else:
        k = k_chunk + tl.arange(0, F)[None, None, :, None] * S + tl.arange(0, S)[None, None, None, :]
    stored = _load_in_place(scales_ptr + n * num_groups + tl.minimum(k // GROUP, num_groups - 1), ASM_LOADS)
    if SCALE_IS_E8M0:
        return tl.exp2(stored.to(tl.float32) - 127.0)
    return stored.to(tl.float32)


@triton.jit
def _k_of_tile(k0, S: tl.constexpr, C: tl.constexpr, F: tl.constexpr):
    """k of every entry of a (BLOCK_N, C, F, S) tile, as (1, C, F, S)."""
    return (k0 + (tl.arange(0, C)[None, :, None, None] * F + tl.arange(0, F)[None, None, :, None]) * S
            + tl.arange(0, S)[None, None, None, :])


@triton.jit
def _codebook(codebook_ptr, BITS: tl.constexpr):
    return tl.load(codebook_ptr + tl.arange(0, 1 << BITS)).to(tl.float32)


@triton.jit
def _decode_tile(words0, words1, words2, codebook, scales_ptr, n, k0, K, num_groups,
                 W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, GROUP: tl.constexpr,
                 SCALE_MODE: tl.constexpr, SCALE_IS_E8M0: tl.constexpr, MASK_K: tl.constexpr,
                 ASM_LOADS: tl.constexpr, S: tl.constexpr, C: tl.constexpr, F: tl.constexpr):
    """W_hat of K tile k0 in fp32 as a (BLOCK_N, C, F, S) tile (k = k0 + (c * F + f) * S + j,
    row-major order is k order); exactly 0 past K."""
    w = _lookup(codebook, words0, words1, words2, W0, W1, W2, C, F) * _scales(
        scales_ptr, n, k0, num_groups, GROUP, SCALE_MODE, SCALE_IS_E8M0, ASM_LOADS, S, C, F)
    if MASK_K:
        # Padding is exactly 0: a NaN codebook entry or an inf scale must not leak into padding
        # (a real NaN must still reach y).
        w = tl.where(_k_of_tile(k0, S, C, F) < K, w, 0.0)
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
def _lut_mma_kernel(
    x_ptr, codes_ptr, codebook_ptr, scales_ptr, y_ptr,
    M, N, K, num_groups, k_per_split,
    row_words0, row_words1, row_words2, plane_base1, plane_base2,
    stride_xm, stride_xk, stride_ym, stride_yn,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    GROUP: tl.constexpr, SCALE_MODE: tl.constexpr, SCALE_IS_E8M0: tl.constexpr, SPLIT_K: tl.constexpr,
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
    offs_n_clamped = tl.minimum(offs_n, N - 1).to(tl.int64)
    n = offs_n_clamped[:, None, None, None]
    codebook = _codebook(codebook_ptr, W0 + W1 + W2)
    x_rows = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * stride_xm
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    words0, words1, words2 = _tile_words(codes_ptr, n, k_start, k_stop, row_words0, row_words1, row_words2,
                                         plane_base1, plane_base2, W0, W1, W2, S, C, F)
    for k0 in range(k_start, k_stop, BLOCK_K):
        next0, next1, next2 = _tile_words(codes_ptr, n, k0 + BLOCK_K, k_stop, row_words0, row_words1, row_words2,
                                          plane_base1, plane_base2, W0, W1, W2, S, C, F)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if MASK_K:
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=(offs_k < K)[None, :], other=0.0)
        else:
            x = tl.load(x_rows + offs_k[None, :] * stride_xk)
        if SCALE_MODE == 3:
            # The whole K tile lies in one group: the dot takes the bare codebook values and its
            # (BLOCK_M, BLOCK_N) result is scaled per column, instead of scaling every weight.
            w = _lookup(codebook, words0, words1, words2, W0, W1, W2, C, F)
            if MASK_K:
                w = tl.where(_k_of_tile(k0, S, C, F) < K, w, 0.0)
            scale = _scales(scales_ptr, offs_n_clamped[None, :], k0, num_groups, GROUP, SCALE_MODE, SCALE_IS_E8M0,
                            ASM_LOADS, S, C, F)
        else:
            # The whole (BLOCK_N, BLOCK_K) tile is decoded once and feeds one dot.
            w = _decode_tile(words0, words1, words2, codebook, scales_ptr, n, k0, K, num_groups,
                             W0, W1, W2, GROUP, SCALE_MODE, SCALE_IS_E8M0, MASK_K, ASM_LOADS, S, C, F)
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        # fp32 activations (and the interpreter, see lut_matmul) get a true fp32 product, not TF32.
        if DOT_IN_FP32 or x.dtype == tl.float32:
            part = tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            part = tl.dot(x, tl.trans(w.to(x.dtype)))
        if SCALE_MODE == 3:
            acc += part * scale
        else:
            acc += part
        words0, words1, words2 = next0, next1, next2
    _store_or_add(y_ptr, acc, offs_m, offs_n, M, N, stride_ym, stride_yn, SPLIT_K)


@triton.jit
def _lut_dequant_kernel(
    codes_ptr, codebook_ptr, scales_ptr, w_ptr,
    N, K, num_groups, row_words0, row_words1, row_words2, plane_base1, plane_base2, stride_wn,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    GROUP: tl.constexpr, SCALE_MODE: tl.constexpr, SCALE_IS_E8M0: tl.constexpr,
    MASK_K: tl.constexpr, ASM_LOADS: tl.constexpr, S: tl.constexpr, F: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """W_hat[rows, :] into w (N rows of a panel, row stride stride_wn) in w's dtype."""
    C: tl.constexpr = BLOCK_K // (F * S)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n = tl.minimum(offs_n, N - 1).to(tl.int64)[:, None, None, None]
    words0, words1, words2 = _tile_words(codes_ptr, n, k0, K, row_words0, row_words1, row_words2,
                                         plane_base1, plane_base2, W0, W1, W2, S, C, F)
    w = _decode_tile(words0, words1, words2, _codebook(codebook_ptr, W0 + W1 + W2), scales_ptr, n, k0, K,
                     num_groups, W0, W1, W2, GROUP, SCALE_MODE, SCALE_IS_E8M0, MASK_K, ASM_LOADS, S, C, F)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
             tl.reshape(w, (BLOCK_N, BLOCK_K)).to(w_ptr.dtype.element_ty),
             mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


@dataclass(frozen=True)
class LaunchConfig:
    """Which kernel and how it is launched. block_k must be a multiple of tile_k(bits), so every
    K tile starts on a word boundary in every plane.

    "mma" computes y directly; "panel" decodes panel_rows rows of W_hat at a time
    (block_n x block_k tiles) into a scratch buffer of x's dtype, small enough to stay in L2,
    and multiplies each panel with torch.matmul (cuBLAS): W_hat is never held whole."""

    kernel: str  # "mma" or "panel"
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    panel_rows: int = 0


# From PANEL_MIN_M rows of x on, the panel path (kernels/BENCHMARKS.md).
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


def scale_mode(group: int, k: int, first_width: int, block_k: int) -> int:
    """How finely the kernels read scales (K tiles start at multiples of block_k, itself a multiple
    of the first plane's chunk): 3, one per K tile (every tile lies in one group); 2, one per
    chunk; 1, one per sub-chunk of SUBCHUNK codes; 0, one per weight (a sub-chunk can span two
    groups)."""
    if group >= k or group % block_k == 0:
        return 3
    if group % plane_chunk(first_width) == 0:
        return 2
    return 1 if group % SUBCHUNK == 0 else 0


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_config(m: int, n: int, k: int, bits: int, interpreted: bool) -> LaunchConfig:
    """The configuration lut_matmul uses for an (m, k) x (k, n) product."""
    if interpreted:
        # The interpreter pays per program and per op, not per element: few, big tiles. A
        # 4864 x 896 6-bit layer at m = 4 cost 4.6 CPU s in tiles of 256 rows, 0.6 s in one tile.
        block_n = min(max(16, triton.next_power_of_2(n)), INTERPRETED_MAX_BLOCK_N)
        return LaunchConfig("mma", min(max(16, triton.next_power_of_2(m)), 64), block_n, 256)
    sms = _multiprocessors(torch.cuda.current_device())
    if m >= PANEL_MIN_M:
        # Sized for 2-byte activations (fp16, bf16); fp32 panels take twice the bytes.
        return LaunchConfig("panel", 0, 64, 256, panel_rows=max(64, PANEL_BYTES // (2 * k) // 64 * 64))
    block_m = min(max(16, triton.next_power_of_2(m)), 128)
    block_n = 64
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    # About four programs per SM: the decode is bound by instruction issue, so SMs need several
    # programs' warps to hide the latency of the shared-memory lookups. Split K only as far as
    # that needs: a split costs two more launches (zeroing and casting the fp32 sums).
    split_k = max(1, min(8, (4 * sms) // tiles, k // 1024))
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
        SCALE_MODE=scale_mode(group, k, widths[0], config.block_k), SCALE_IS_E8M0=scales.dtype == torch.uint8,
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
    if config.kernel == "mma":
        if min(config.block_m, config.block_n) < 16:
            raise ValueError("the mma kernel needs block_m and block_n >= 16 (tl.dot)")
        grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), splits)
        _lut_mma_kernel[grid](*args, DOT_IN_FP32=interpreted, **constants)
    else:
        raise ValueError(f"config.kernel must be 'mma' or 'panel', got {config.kernel!r}")
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
