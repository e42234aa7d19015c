"""y = x @ W_hat^T straight from the packed codes: Triton lookup-table matmuls.

Every kernel decodes a (BLOCK_N, BLOCK_K) weight tile the same way: each int32 word of each bit
plane (sopq/packing.py) is loaded once (the next K tile's words while this one is decoded),
split into codes four at a time, one a byte (_codes), and the codes are looked up in the
codebook, which tl.gather reads from shared memory. Group scales multiply either each weight or,
where a whole K tile lies in one group, the tile's product. W_hat is never held whole in memory.

- _lut_mma_kernel (M < PANEL_MIN_M, M = 1 included): (BLOCK_M, BLOCK_N) output tiles on the
  tensor cores (one tl.dot per K tile, fp32 accumulation); the decode is shared by BLOCK_M rows
  of x. At M = 1 the smallest tile's 15 padding rows read no x and cost little next to the decode.
  Kernel "mma" computes x W_hat^T; "mma_w" (tiles of <= W_FIRST_MAX_BLOCK_M rows of x) computes
  y^T = W_hat x^T, so the decoded tile is the dot's first operand: on Hopper a 64-row wgmma
  whose weight operand comes from registers instead of a 16-row mma.sync.
- _lut_wgmma_kernel (Gluon, Hopper; small M, see launch_config, where wgmma_fits): "mma_w" with explicit
  register layouts, so that each thread loads and decodes exactly the weights it holds in the
  wgmma A fragment and the decoded tile never passes through shared memory; its codebook is a
  static shared-memory array that the decode indexes by byte offsets (_g_decode), and everything
  a program's short K split reads (x's slice and the words of both planes) comes by TMA into
  shared memory at once, before its loop.
- _lut_wgmma_ring_kernel (Gluon, Hopper; 16 < M <= WGMMA_RING_MAX_M where wgmma_fits): the
  same decode for up to 128 rows of x, whose tiles and the words come by TMA through rings of
  shared-memory buffers; asynchronous wgmmas overlap the next tile's decode.
- panel path (M >= PANEL_MIN_M): _lut_dequant_kernel (on Hopper where wgmma_fits,
  _lut_dequant_wgmma_kernel, the Gluon kernels' decode) decodes a panel of W_hat rows into a
  scratch buffer and torch.matmul (cuBLAS) multiplies it; the decode is shared by all M.
With split_k > 1 the programs add their partial sums with (relaxed) atomics into a per-stream fp32
workspace kept at zero between launches (_split_k_workspace), which _cast_and_clear_kernel casts
into the output (or, for the ring kernel at one row block, the last program of each block).
lut_matmul picks the kernel and launch configuration from M (launch_config); speeds and where
the time goes: kernels/BENCHMARKS.md.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.extra.cuda import gdc_wait
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
    rows n, as a (BLOCK_N, C, 1, 1, S) tile; chunks from `limit` on read 0.

    k0 is a multiple of F * S and F divides this plane's 32 / WIDTH fields per word, so the F
    sub-chunks of one chunk share their S words (sopq/packing.py): each word is loaded once, and
    shifted once so that the chunk's F fields start at bit 0 (field f at bits f * WIDTH)."""
    PER_WORD: tl.constexpr = 32 // WIDTH
    sub = k0 // S + tl.arange(0, C)[None, :, None, None, None] * F
    words = tl.load(codes_ptr + plane_base + n * row_words + (sub // PER_WORD) * S
                    + tl.arange(0, S)[None, None, None, None, :], mask=sub * S < limit, other=0)
    if PER_WORD > F:
        words = words >> ((sub % PER_WORD) * WIDTH)
    return words


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
def _byte_pairs(words, ASM: tl.constexpr):
    """Bytes (b0, b0, b1, b1) of words whose low bytes are (b0, b1): one prmt on the GPU."""
    if ASM:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, 0, 0x1100;", "=r,r", [words],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        low = words & 0xFF
        high = words & 0xFF00
        return low | (low << 8) | (high << 8) | (high << 16)


@triton.jit
def _codes(words0, words1, words2, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
           SP: tl.constexpr, ASM: tl.constexpr):
    """The codes of a K tile as a (BLOCK_N, C, SP, 4, S) tile: entry [n, c, s, b, j] is the code
    of field f = b * SP + s of chunk c, i.e. k = k0 + (c * F + f) * S + j (_k_of_tile).

    Four codes at a time, one a byte of a 32-bit word: with 4-bit first-plane fields, f and
    f + 2, f + 4, f + 6 lie in the four bytes of the word (one mask for four codes, after a
    shift by 4 for odd f); a 2-bit plane's fields are spread to bits 4-5 of the same bytes by
    one byte permute and two masked shifts per four codes. Each code then costs one byte
    extraction; a 1-bit plane (5 and 7 bits) is added field by field."""
    s = tl.arange(0, SP)[None, None, :, None, None]
    b = tl.arange(0, 4)[None, None, None, :, None]
    if W0 == 8:
        quads = words0
    else:
        quads = (words0 >> (4 * s)) & 0x0F0F0F0F
    if W1 == 2:
        # pairs holds fields 0-3 in bytes 0 and 1, fields 4-7 in bytes 2 and 3 (2 bits each):
        # field 2b + s sits at bit 2s of byte b (b even) or 4 + 2s (b odd).
        pairs = _byte_pairs(words1, ASM)
        quads |= ((pairs << (4 - 2 * s)) & 0x00300030) | ((pairs >> (2 * s)) & 0x30003000)
    codes = (quads >> (8 * b)) & 0xFF
    if W1 == 1:
        codes |= ((words1 >> (b * SP + s)) & 1) << W0
    if W2 == 1:
        codes |= ((words2 >> (b * SP + s)) & 1) << (W0 + W1)
    return codes


@triton.jit
def _load_in_place(ptrs, ASM: tl.constexpr):
    """tl.load(ptrs) in the register layout of the pointers themselves.

    For the group scales, tl.load would make Triton choose a layout of its own for the load and
    move it through shared memory to get back to the weights' layout; an inline-asm load keeps
    the layout. The interpreter cannot run PTX and takes tl.load (ASM false)."""
    if ASM:
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
def _lookup(codebook, codes):
    """codebook[codes] in the codebook's dtype.

    The codebook sits in registers (loaded once per program); tl.gather copies it to shared
    memory and reads one entry per code from there: one shared load at a 32-bit address, where a
    load from global memory (L1) needed a 64-bit one, and Triton keeps the codes' layout. An fp16
    codebook (64 entries, 128 bytes at 6 bits) spans the 32 banks once, so a warp's 32 lookups
    never conflict; an fp32 one (256 bytes) puts two entries in each bank."""
    return tl.reshape(tl.gather(codebook, tl.reshape(codes, (codes.numel,)), 0), codes.shape)


@triton.jit
def _sub_chunk_k(k0, S: tl.constexpr, C: tl.constexpr, SP: tl.constexpr, F: tl.constexpr):
    """First k of every sub-chunk of S codes of a (BLOCK_N, C, SP, 4, S) tile (_codes), as
    (1, C, SP, 4, 1)."""
    f = tl.arange(0, 4)[None, None, None, :, None] * SP + tl.arange(0, SP)[None, None, :, None, None]
    return k0 + (tl.arange(0, C)[None, :, None, None, None] * F + f) * S


@triton.jit
def _k_of_tile(k0, S: tl.constexpr, C: tl.constexpr, SP: tl.constexpr, F: tl.constexpr):
    """k of every entry of a (BLOCK_N, C, SP, 4, S) tile (_codes), as (1, C, SP, 4, S)."""
    return _sub_chunk_k(k0, S, C, SP, F) + tl.arange(0, S)[None, None, None, None, :]


@triton.jit
def _natural(tile, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A (BLOCK_N, C, SP, 4, S) tile as (BLOCK_N, BLOCK_K) in k order (f = b * SP + s)."""
    return tl.reshape(tl.permute(tile, (0, 1, 3, 2, 4)), (BLOCK_N, BLOCK_K))


@triton.jit
def _scales(scales_ptr, n, k0, num_groups, stride_sn, stride_sg, GROUP: tl.constexpr, SCALE_MODE: tl.constexpr,
            SCALE_IS_E8M0: tl.constexpr, ASM: tl.constexpr, S: tl.constexpr, C: tl.constexpr,
            SP: tl.constexpr, F: tl.constexpr):
    """fp32 group scales of the K tile at k0 for rows n: one per row, in the shape of n, when the
    whole tile lies in one group (SCALE_MODE 3); else broadcastable to the tile's
    (BLOCK_N, C, SP, 4, S) shape: one per chunk of F * S codes (2), per sub-chunk of S codes (1)
    or per weight (0). Groups past K read the row's last one; their products are discarded."""
    if SCALE_MODE == 3:
        k = k0
    elif SCALE_MODE == 2:
        k = k0 + tl.arange(0, C)[None, :, None, None, None] * (F * S)
    elif SCALE_MODE == 1:
        k = _sub_chunk_k(k0, S, C, SP, F)
    else:
        k = _k_of_tile(k0, S, C, SP, F)
    stored = _load_in_place(scales_ptr + n * stride_sn + tl.minimum(k // GROUP, num_groups - 1) * stride_sg, ASM)
    if SCALE_IS_E8M0:
        return tl.exp2(stored.to(tl.float32) - 127.0)
    return stored.to(tl.float32)


@triton.jit
def _codebook(codebook_ptr, BITS: tl.constexpr):
    return tl.load(codebook_ptr + tl.arange(0, 1 << BITS))


@triton.jit
def _decode_tile(words0, words1, words2, codebook, scales_ptr, n, k0, K, num_groups, stride_sn, stride_sg,
                 W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, GROUP: tl.constexpr,
                 SCALE_MODE: tl.constexpr, SCALE_IS_E8M0: tl.constexpr, MASK_K: tl.constexpr,
                 ASM: tl.constexpr, S: tl.constexpr, C: tl.constexpr, F: tl.constexpr):
    """W_hat of K tile k0 in fp32 as a (BLOCK_N, C, SP, 4, S) tile (_codes); exactly 0 past K."""
    SP: tl.constexpr = F // 4
    w = _lookup(codebook, _codes(words0, words1, words2, W0, W1, W2, SP, ASM)).to(tl.float32)
    w *= _scales(scales_ptr, n, k0, num_groups, stride_sn, stride_sg, GROUP, SCALE_MODE, SCALE_IS_E8M0, ASM, S, C,
                 SP, F)
    if MASK_K:
        # Padding is exactly 0: a NaN codebook entry or an inf scale must not leak into padding
        # (a real NaN must still reach y).
        w = tl.where(_k_of_tile(k0, S, C, SP, F) < K, w, 0.0)
    return w


@triton.jit
def _store_or_add(y_ptr, acc, offs_r, offs_c, R, C, stride_yr, stride_yc, SPLIT_K: tl.constexpr):
    """acc[i, j] into y at (offs_r[i], offs_c[j]): rows and columns of y, or columns and rows."""
    y_ptrs = y_ptr + offs_r[:, None].to(tl.int64) * stride_yr + offs_c[None, :].to(tl.int64) * stride_yc
    mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    if SPLIT_K > 1:
        # Relaxed: see _lut_wgmma_kernel.
        tl.atomic_add(y_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lut_mma_kernel(
    x_ptr, codes_ptr, codebook_ptr, scales_ptr, y_ptr,
    M, N, K, num_groups, stride_sn, stride_sg, k_per_split,
    row_words0, row_words1, row_words2, plane_base1, plane_base2,
    stride_xm, stride_xk, stride_ym, stride_yn,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    GROUP: tl.constexpr, SCALE_MODE: tl.constexpr, SCALE_IS_E8M0: tl.constexpr, SPLIT_K: tl.constexpr,
    MASK_K: tl.constexpr, ASM: tl.constexpr, DOT_IN_FP32: tl.constexpr, SCALE_DOT: tl.constexpr,
    W_FIRST: tl.constexpr,
    S: tl.constexpr, F: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """SCALE_DOT (only with SCALE_MODE 3): the dot takes the bare codebook values and its
    (BLOCK_M, BLOCK_N) result is scaled per weight row, instead of scaling every weight; cheaper
    while BLOCK_M is small against BLOCK_K (lut_matmul decides).

    W_FIRST: the product is y^T = W_hat x^T, accumulated as (BLOCK_N, BLOCK_M). Triton then makes
    the decoded tile the A operand of a wgmma (BLOCK_N >= 64 rows, read from registers) and x^T
    its B operand from shared memory; with x first, a 16-row tile is too short for wgmma and runs
    mma.sync with both operands read back from shared memory. The decoded tile still passes
    through shared memory once, to reach the wgmma register layout (kernels/BENCHMARKS.md)."""
    C: tl.constexpr = BLOCK_K // (F * S)
    SP: tl.constexpr = F // 4
    # Programs that share a weight tile (same pid_n) are adjacent, so its bytes come from L2.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past N read row N - 1 (in bounds, no masks) and are not stored. int64: row offsets
    # times row lengths exceed 2^31 for large layers.
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    n = rows[:, None, None, None, None]
    codebook = _codebook(codebook_ptr, W0 + W1 + W2)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    if W_FIRST:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The words of the next K tile are loaded while this one is decoded (they are few: 6 bits a
    # weight), so the decode does not wait for memory.
    words0, words1, words2 = _tile_words(codes_ptr, n, k_start, k_stop, row_words0, row_words1, row_words2,
                                         plane_base1, plane_base2, W0, W1, W2, S, C, F)
    for k0 in range(k_start, k_stop, BLOCK_K):
        next0, next1, next2 = _tile_words(codes_ptr, n, k0 + BLOCK_K, k_stop, row_words0, row_words1, row_words2,
                                          plane_base1, plane_base2, W0, W1, W2, S, C, F)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        # Rows of the tile past M read nothing (zeros): at M = 1 that is 15 of 16 rows.
        if MASK_K:
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=(offs_m < M)[:, None] & (offs_k < K)[None, :],
                        other=0.0)
        else:
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=(offs_m < M)[:, None], other=0.0)
        if SCALE_DOT:
            # The whole K tile lies in one group: scale the dot's result, not the weights.
            w = _lookup(codebook, _codes(words0, words1, words2, W0, W1, W2, SP, ASM))
            if MASK_K:
                w = tl.where(_k_of_tile(k0, S, C, SP, F) < K, w, 0.0)
            if W_FIRST:
                scale_rows = rows[:, None]
            else:
                scale_rows = rows[None, :]
            scale = _scales(scales_ptr, scale_rows, k0, num_groups, stride_sn, stride_sg, GROUP, SCALE_MODE,
                            SCALE_IS_E8M0, ASM, S, C, SP, F)
        else:
            # The whole (BLOCK_N, BLOCK_K) tile is decoded once and feeds one dot.
            w = _decode_tile(words0, words1, words2, codebook, scales_ptr, n, k0, K, num_groups, stride_sn,
                             stride_sg, W0, W1, W2, GROUP, SCALE_MODE, SCALE_IS_E8M0, MASK_K, ASM, S, C, F)
        w = _natural(w, BLOCK_N, BLOCK_K)
        # fp32 activations (and the interpreter, see lut_matmul) get a true fp32 product, not TF32.
        if W_FIRST:
            if DOT_IN_FP32 or x.dtype == tl.float32:
                part = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
            else:
                part = tl.dot(w.to(x.dtype), tl.trans(x))
        elif DOT_IN_FP32 or x.dtype == tl.float32:
            part = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            part = tl.dot(x, tl.trans(w.to(x.dtype)))
        if SCALE_DOT:
            acc += part * scale
        else:
            acc += part
        words0, words1, words2 = next0, next1, next2
    if W_FIRST:
        _store_or_add(y_ptr, acc, offs_n, offs_m, N, M, stride_yn, stride_ym, SPLIT_K)
    else:
        _store_or_add(y_ptr, acc, offs_m, offs_n, M, N, stride_ym, stride_yn, SPLIT_K)


@triton.jit
def _lut_dequant_kernel(
    codes_ptr, codebook_ptr, scales_ptr, w_ptr,
    N, K, num_groups, stride_sn, stride_sg, row_words0, row_words1, row_words2, plane_base1, plane_base2, stride_wn,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    GROUP: tl.constexpr, SCALE_MODE: tl.constexpr, SCALE_IS_E8M0: tl.constexpr,
    MASK_K: tl.constexpr, ASM: tl.constexpr, S: tl.constexpr, F: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """W_hat[rows, :] into w (N rows of a panel, row stride stride_wn) in w's dtype."""
    C: tl.constexpr = BLOCK_K // (F * S)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n = tl.minimum(offs_n, N - 1).to(tl.int64)[:, None, None, None, None]
    words0, words1, words2 = _tile_words(codes_ptr, n, k0, K, row_words0, row_words1, row_words2,
                                         plane_base1, plane_base2, W0, W1, W2, S, C, F)
    w = _decode_tile(words0, words1, words2, _codebook(codebook_ptr, W0 + W1 + W2), scales_ptr, n, k0, K,
                     num_groups, stride_sn, stride_sg, W0, W1, W2, GROUP, SCALE_MODE, SCALE_IS_E8M0, MASK_K, ASM, S,
                     C, F)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
             _natural(w, BLOCK_N, BLOCK_K).to(w_ptr.dtype.element_ty),
             mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


@triton.jit
def _cast_and_clear_kernel(sums_ptr, out_ptr, numel, N, stride_om, stride_on, BLOCK: tl.constexpr,
                           DEPENDENT: tl.constexpr):
    """out = the (M, N) row-major fp32 split-K sums, in out's dtype, and the sums back to zero
    (_split_k_workspace): one kernel where zeroing the sums before the launch and casting them after
    took two. DEPENDENT (Hopper and later): launched as a programmatic dependent launch
    (lut_matmul), its programs may start while the kernel that adds the sums still runs, and wait
    here until it has finished and its sums are visible (griddepcontrol needs sm_90).
    """
    if DEPENDENT:
        gdc_wait()
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    total = tl.load(sums_ptr + offs, mask=mask)
    tl.store(out_ptr + offs // N * stride_om + offs % N * stride_on, total.to(out_ptr.dtype.element_ty), mask=mask)
    # Triton lays the load and the zeroing store out differently (8 and 4 elements a thread on
    # sm_90), so a sum is zeroed by another warp than the one that reads it: without the barrier,
    # some sums were zeroed before they were read (H200, 64 x 40960 split-K sums: 1e-2 relative
    # error). Every warp has read its sums (its store above consumed them) before any zeroes one.
    tl.debug_barrier()
    tl.store(sums_ptr + offs, tl.zeros_like(total), mask=mask)


# The Gluon kernel ("wgmma", Hopper): 4 warps, 64 weight rows x 16 rows of x, K tiles of 128.
# Each thread decodes exactly the weights it holds in the wgmma A fragment: warp w, lane l has
# rows 16 w + l / 4 (+ 8) and, in every 16-wide K step f, k = 16 f + 2 (l % 4) (+ 1) (+ 8). A
# K tile of a 4-bit first plane is one chunk: k = 16 f + j is field f of word j of the row
# (sopq/packing.py), so the thread loads words j = 2 (l % 4) (+ 1) (+ 8) of its two rows and
# finds all 8 fields of each in its own registers. Codes are 7-D tensors
# (warp, h, r, b, sp, jh, jl): row 16 warp + 8 h + r, field f = 2 b + sp, j = 8 jh + jl, so that
# k = 32 b + 16 sp + 8 jh + jl; flattened, that is the A fragment itself, and the decoded tile
# reaches the wgmma without passing through shared memory. Fields f = 2 b + sp of the 4-bit
# plane sit in byte b of the word shifted right by 4 sp: one mask yields four codes (_codes).
_G_RANK = 7


def _axis_layout(layout, dim: int):
    """The 1-D layout of dimension `dim` of a _G_RANK-D layout (the others sliced away)."""
    for d in reversed(range(_G_RANK)):
        if d != dim:
            layout = gl.SliceLayout(d, layout)
    return gl.constexpr(layout)


_G_ORDER = list(reversed(range(_G_RANK)))
_G_CODES_LAYOUT = gl.BlockedLayout([1, 2, 1, 4, 2, 2, 2], [1, 1, 8, 1, 1, 1, 4], [4, 1, 1, 1, 1, 1, 1], _G_ORDER)
_G_WORDS_LAYOUT = gl.BlockedLayout([1, 2, 1, 1, 1, 2, 2], [1, 1, 8, 1, 1, 1, 4], [4, 1, 1, 1, 1, 1, 1], _G_ORDER)
_G_CODES = gl.constexpr(_G_CODES_LAYOUT)
_G_WORDS = gl.constexpr(_G_WORDS_LAYOUT)
# A K tile's words of one plane in shared memory, as TMA writes them: words jh = 0..7 of the 64
# rows, then words 8..15 (two boxes of 64 rows x 8 words, unswizzled; _word_descriptor), viewed
# with the words' 7 dimensions: the same bytes. A quarter warp's 8-byte loads (lanes 4 r + q:
# words 2 q, 2 q + 1 of row r) then cover 128 contiguous bytes, one wavefront; rows of 16 words
# put rows r and r + 2 in the same banks, two wavefronts.
_G_WORDS_SHAPE = gl.constexpr([4, 2, 8, 1, 1, 2, 8])
_G_WORDS_SMEM = gl.constexpr(gl.SwizzledSharedLayout(1, 1, 1, [6, 4, 3, 2, 1, 0, 5]))
_G_WORDS_TMA = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3)
# 1-D layouts of the dimensions that aranges index: the codes' b and sp.
_G_C3, _G_C4 = (_axis_layout(_G_CODES_LAYOUT, d) for d in (3, 4))
_G_TABLE = gl.constexpr(gl.BlockedLayout([1], [32], [4], [0]))
# A decoded 64 x 128 tile as _lut_dequant_wgmma_kernel stores it: 8 consecutive k a thread, a warp
# two whole rows (2 x 256 bytes of fp16).
_G_PANEL_STORE = gl.constexpr(gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0]))
# The codebook's copy in shared memory: a static array declared in PTX, whose address is a
# constant that ptxas folds into every lookup (LDS [R + UR]), so the decode's byte offsets need
# no address arithmetic (gl.gather computed base + 2 code per lookup and stored its own copy of
# the table, with two barriers, at every K tile). Triton 3.6's Gluon has no indexed shared load.
_TABLE_ASM = gl.constexpr(".shared .align 16 .b8 sopq_codebook[128];\nmov.b32 $0, 0;")
_TABLE_STORE_ASM = gl.constexpr("{ .reg .u32 a; mov.u32 a, sopq_codebook; add.u32 a, a, $1; st.shared.b16 [a], $2; }"
                                "\nmov.b32 $0, 0;")
_TABLE_LOAD_ASM = gl.constexpr("{ .reg .u32 a; mov.u32 a, sopq_codebook; add.u32 a, a, $1; ld.shared.b16 $0, [a]; }")
# Triton 3.6 names the TMA load async_copy_global_to_shared; later versions, async_load.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
G_BLOCK_N, G_BLOCK_K = gl.constexpr(64), gl.constexpr(128)
# The wgmma kernel keeps x and the words for its whole K split in shared memory: 80 KB a program
# at 1024 (6 bits).
G_MAX_SPLIT_K = 1024


@gluon.jit
def _index(N: gl.constexpr, DIM: gl.constexpr, AXIS_LAYOUT: gl.constexpr):
    """arange(0, N) along dimension DIM of a 7-D tensor whose layout has AXIS_LAYOUT as that
    dimension's 1-D layout (_axis_layout), size 1 elsewhere."""
    x = gl.arange(0, N, layout=AXIS_LAYOUT)
    for d in gl.static_range(7):  # _G_RANK
        if d != DIM:
            x = gl.expand_dims(x, d)
    return x


@gluon.jit
def _g_fill_table(table_ptr, TABLE_SIZE: gl.constexpr):
    """Declare the codebook's shared-memory copy (_TABLE_ASM) and fill it from table_ptr
    (threads past TABLE_SIZE store a copy of an entry). The lookups (pure asm, invisible to the
    compiler as memory accesses) take offsets decoded from words read from shared memory after
    the barrier, so they cannot move above it."""
    # Declared once per thread (one element each), before any use.
    gl.inline_asm_elementwise(_TABLE_ASM, "=r,r", [gl.arange(0, 128, layout=_G_TABLE)], dtype=gl.int32,
                              is_pure=False, pack=1)
    entry = gl.arange(0, TABLE_SIZE, layout=_G_TABLE)
    gl.inline_asm_elementwise(_TABLE_STORE_ASM, "=r,r,h", [entry * 2, gl.load(table_ptr + entry)], dtype=gl.int32,
                              is_pure=False, pack=1)
    gl.thread_barrier()


@gluon.jit
def _g_decode(words0, words1, k0, W1: gl.constexpr, DTYPE: gl.constexpr, A_LAYOUT: gl.constexpr):
    """The K tile's codebook values (x's dtype) in the wgmma A layout, four codes at a time as
    in _codes, but each byte b of quads holds twice the code of field 2 b + sp: the byte offset
    of its entry in the shared table, which one prmt extracts and the load takes as it is.
    A 2-bit plane's words come unshifted (a box serves two K tiles): K tile k0 is half k0 // 128 % 2."""
    b = _index(4, 3, _G_C3)
    sp = _index(2, 4, _G_C4)
    words0 = gl.convert_layout(words0, _G_CODES)
    quads = gl.where(sp == 0, words0 << 1, words0 >> 3) & 0x1E1E1E1E
    if W1 == 2:
        # Byte b of spread: byte b // 2 of this tile's half of the word, shifted right by 4 for
        # odd b, so that field 2 b + sp sits at bits 2 sp of every byte: one shift to bits 5-6.
        words1 = gl.convert_layout(words1, _G_CODES)
        spread = gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r",
                                           [words1, words1 >> 4, 0x5140 + k0 // 128 % 2 * 0x2222],
                                           dtype=gl.int32, is_pure=True, pack=1)
        quads |= (spread << (5 - 2 * sp)) & 0x60606060
    # Byte b of every quad, zero-extended: one prmt (selector 0x4440 + b).
    offsets = gl.inline_asm_elementwise("prmt.b32 $0, $1, 0, $2;", "=r,r,r", [quads, 0x4440 + b],
                                        dtype=gl.int32, is_pure=True, pack=1)
    if W1 == 1:
        offsets |= ((gl.convert_layout(words1, _G_CODES) >> (2 * b + sp)) & 1) << 5
    w = gl.inline_asm_elementwise(_TABLE_LOAD_ASM, "=h,r", [offsets], dtype=DTYPE.value, is_pure=True, pack=1)
    return gl.convert_layout(gl.reshape(w, [G_BLOCK_N, G_BLOCK_K]), A_LAYOUT)


@gluon.jit
def _g_scale(stored, SCALE_IS_E8M0: gl.constexpr):
    """Stored scales (fp16, bf16 or e8m0 bytes) as fp32."""
    if SCALE_IS_E8M0:
        return gl.exp2(stored.to(gl.float32) - 127.0)
    return stored.to(gl.float32)


@gluon.jit
def _g_store(y_ptr, acc, offs_n, pid_m, M, N, stride_ym, stride_yn, sums_ptr, arrivals_ptr, block,
             BLOCK_M: gl.constexpr, ACC_LAYOUT: gl.constexpr, SPLIT_K: gl.constexpr, LAST_CASTS: gl.constexpr):
    """A program's (64, BLOCK_M) block of y^T (rows offs_n) into y. With split K and not
    LAST_CASTS, added into y (the fp32 workspace, cast after the launch by _cast_and_clear_kernel).
    With split K and LAST_CASTS, added into the block's fp32 sums (sums_ptr, M x N); the programs
    of the block count themselves in (arrivals_ptr[block]), and the last to arrive casts the total
    into y and leaves sums and count at zero for the next launch (_split_k_workspace). That spares
    the launch its kernels over the M x N fp32 sums (measured against a zeroing and a casting one),
    but holds every program until its adds and its count have made a round trip to L2: worth it
    for the ring kernel's few long programs, not for the wgmma kernel's many short ones
    (kernels/BENCHMARKS.md)."""
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, ACC_LAYOUT))
    if SPLIT_K > 1 and LAST_CASTS:
        mask = _g_in_y(offs_m, offs_n, M, N)
        # 32-bit offsets (M x N < 2^31, see lut_matmul): fewer registers than 64-bit pointers.
        sums_ptrs = sums_ptr + (gl.expand_dims(offs_m, 0) * N + gl.expand_dims(offs_n, 1))
        # Relaxed: the sums need no ordering among themselves. Every thread's fence, then the
        # barrier, then the count's release publish them all to the last program, whose acquire
        # sees them (one thread's fence would wait for its own adds only).
        gl.atomic_add(sums_ptrs, acc, mask=mask, sem="relaxed")
        gl.inline_asm_elementwise("fence.acq_rel.gpu;\nmov.b32 $0, 0;", "=r,r", [gl.arange(0, 128, layout=_G_TABLE)],
                                  dtype=gl.int32, is_pure=False, pack=1)
        gl.thread_barrier()
        if gl.atomic_add(arrivals_ptr + block, 1, sem="acq_rel") == gl.num_programs(2) - 1:
            # .cg: from L2, where the other programs' sums are, not from a stale line in L1.
            total = gl.load(sums_ptrs, mask=mask, cache_modifier=".cg")
            gl.store(sums_ptrs, gl.zeros_like(total), mask=mask)
            # y's addresses only now: 64-bit pointers held through the adds spilled.
            y_ptrs = _g_y_ptrs(y_ptr, offs_m, offs_n, stride_ym, stride_yn)
            gl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
            gl.store(arrivals_ptr + block, 0)
    else:
        # Addresses, then mask: in this order the ring kernel at two row blocks compiles as it did
        # before LAST_CASTS existed (3,240 instructions); an earlier version with the mask first
        # compiled to 3,144 and ran 4-11% slower at M = 128 on the H200.
        y_ptrs = _g_y_ptrs(y_ptr, offs_m, offs_n, stride_ym, stride_yn)
        mask = _g_in_y(offs_m, offs_n, M, N)
        if SPLIT_K > 1:
            # Relaxed: the sums need no ordering among themselves (the launch's end publishes them);
            # the default acq_rel fenced every add with MEMBAR.GPU and invalidated L1 after it.
            gl.atomic_add(y_ptrs, acc, mask=mask, sem="relaxed")
        else:
            gl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _g_y_ptrs(y_ptr, offs_m, offs_n, stride_ym, stride_yn):
    """Addresses of y[offs_m, offs_n], as a (len(offs_n), len(offs_m)) block of y^T."""
    return (y_ptr + gl.expand_dims(offs_m.to(gl.int64), 0) * stride_ym
            + gl.expand_dims(offs_n.to(gl.int64), 1) * stride_yn)


@gluon.jit
def _g_in_y(offs_m, offs_n, M, N):
    """Which elements of that block lie inside y."""
    return gl.expand_dims(offs_m < M, 0) & gl.expand_dims(offs_n < N, 1)


@gluon.constexpr_function
def _g_tiles_per_box1(W1: int) -> int:
    """K tiles per TMA box of the second plane (a box: 16 words of each of 64 rows, 32 / W1 fields a word)."""
    return 1 if W1 == 0 else 4 // W1


@gluon.constexpr_function
def _g_boxes1(x_tiles: int, W1: int) -> int:
    """Boxes of the second plane for x_tiles K tiles (1 when there is no second plane)."""
    return x_tiles // _g_tiles_per_box1(W1) if W1 > 0 else 1


@gluon.jit
def _g_words_buffers(words0_desc, words1_desc, X_TILES: gl.constexpr, W1: gl.constexpr):
    """Shared memory for X_TILES K tiles' words of both planes (_g_load_words) and their barriers,
    initialized: (w0_smem, w1_smem, ready)."""
    w0_smem = gl.allocate_shared_memory(gl.int32, [X_TILES, 2, G_BLOCK_N, 8], words0_desc.layout)
    w1_smem = gl.allocate_shared_memory(gl.int32, [_g_boxes1(X_TILES, W1), 2, G_BLOCK_N, 8], words1_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [X_TILES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(X_TILES):
        mbarrier.init(ready.index(i), count=1)
    return w0_smem, w1_smem, ready


@gluon.jit
def _g_load_words(words0_desc, words1_desc, w0_smem, w1_smem, ready, i: gl.constexpr, k0, n0,
                  OTHER_BYTES: gl.constexpr, W1: gl.constexpr):
    """Issue the TMA loads of K tile i's words (at k0, rows n0 to n0 + 63) into w0_smem[i] and, at
    the first tile of each box of the second plane, that box into w1_smem; ready[i] expects them
    and OTHER_BYTES more (loads the caller issues on it)."""
    T1: gl.constexpr = _g_tiles_per_box1(W1)
    BYTES: gl.constexpr = words0_desc.block_type.nbytes + OTHER_BYTES
    if W1 > 0 and i % T1 == 0:
        mbarrier.expect(ready.index(i), BYTES + words1_desc.block_type.nbytes)
        _tma_load(words1_desc, [k0 // (64 * T1), n0, 0], ready.index(i), w1_smem.index(i // T1))
    else:
        mbarrier.expect(ready.index(i), BYTES)
    _tma_load(words0_desc, [k0 // 64, n0, 0], ready.index(i), w0_smem.index(i))


@gluon.jit
def _g_box_words(box):
    """A box of words in shared memory, as TMA wrote it (_word_descriptor), in the words' layout
    (_G_WORDS)."""
    return box._reinterpret(gl.int32, _G_WORDS_SHAPE, _G_WORDS_SMEM).load(_G_WORDS)


@gluon.jit
def _g_tile_words(w0_smem, w1_smem, ready, i: gl.constexpr, box1, W1: gl.constexpr):
    """K tile i's words of both planes (_G_WORDS), once ready[i] has them (_g_load_words), and the
    box of the second plane they come from: read from shared memory at its first tile, else box1."""
    T1: gl.constexpr = _g_tiles_per_box1(W1)
    mbarrier.wait(ready.index(i), 0)
    words0 = _g_box_words(w0_smem.index(i))
    words1 = words0
    if W1 > 0:
        if i % T1 == 0:
            box1 = _g_box_words(w1_smem.index(i // T1))
        words1 = box1
        if W1 == 1:
            words1 = box1 >> (i % T1 * 8)  # this tile's 8 fields at bit 0 (_g_decode)
    return words0, words1, box1


@gluon.jit
def _lut_wgmma_kernel(
    x_desc, words0_desc, words1_desc, table_ptr, scales_ptr, y_ptr,
    M, N, K, num_groups, stride_sn, stride_sg, k_per_split, stride_ym, stride_yn,
    W1: gl.constexpr, GROUP: gl.constexpr, SCALE_IS_E8M0: gl.constexpr, SPLIT_K: gl.constexpr,
    TABLE_SIZE: gl.constexpr, X_TILES: gl.constexpr, BLOCK_M: gl.constexpr,
):
    """y^T = W_hat x^T for codes of 4 + W1 bits (W1 in 0, 1, 2), K a multiple of 128 and one
    group per K tile (scale_mode 3): each K tile's dot takes the bare codebook values (x's dtype)
    and its result is scaled per weight row.

    Everything the split reads comes by TMA into shared memory at once, before the loop: its
    slice of x (X_TILES tiles of 16 x 128) and the words of both planes (64 rows x 16 words a
    tile; a 2-bit plane's box serves two tiles, a 1-bit plane's four), one barrier per tile.
    Registers holding words one or two tiles ahead kept too few bytes in flight to cover memory
    latency, and cost registers (occupancy); shared memory holds all of them, and the copy
    engine, not the threads, issues them. Tiles past K (a short last split) are computed all the
    same, on the zeros TMA fills x and the words with there, and scaled by 0 (a stored scale may
    be inf)."""
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
    A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
    pid_m = gl.program_id(0)
    pid_n = gl.program_id(1)
    pid_k = gl.program_id(2)
    k_start = pid_k * k_per_split
    n0 = pid_n * G_BLOCK_N
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [X_TILES, BLOCK_M, G_BLOCK_K], x_desc.layout)
    w0_smem, w1_smem, ready = _g_words_buffers(words0_desc, words1_desc, X_TILES, W1)
    for i in gl.static_range(X_TILES):
        k0 = k_start + i * G_BLOCK_K
        # Words first: they come from memory, x from L2.
        _g_load_words(words0_desc, words1_desc, w0_smem, w1_smem, ready, i, k0, n0, x_desc.block_type.nbytes, W1)
        _tma_load(x_desc, [pid_m * BLOCK_M, k0], ready.index(i), x_smem.index(i))
    # The cast kernel after a split-K launch (lut_matmul) may start once every program has come
    # this far: its launch overlaps the last programs, and it waits for them (gdc_wait).
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents;\nmov.b32 $0, 0;", "=r,r",
                              [gl.arange(0, 128, layout=_G_TABLE)], dtype=gl.int32, is_pure=False, pack=1)

    offs_n = n0 + gl.arange(0, G_BLOCK_N, layout=gl.SliceLayout(1, ACC))
    scale_rows = scales_ptr + gl.minimum(offs_n, N - 1).to(gl.int64) * stride_sn
    # Scales past K read the last group's (and are zeroed below).
    last_group = num_groups - 1
    stored = gl.load(scale_rows + gl.minimum(k_start // GROUP, last_group) * stride_sg)
    stored_next = gl.load(scale_rows + gl.minimum((k_start + G_BLOCK_K) // GROUP, last_group) * stride_sg)
    _g_fill_table(table_ptr, TABLE_SIZE)

    acc = gl.zeros([G_BLOCK_N, BLOCK_M], gl.float32, ACC)
    box1 = scale_rows  # a placeholder: tile 0 loads the first box of the second plane
    for i in gl.static_range(X_TILES):
        k0 = k_start + i * G_BLOCK_K
        if i + 2 < X_TILES:
            stored_far = gl.load(scale_rows + gl.minimum((k0 + 2 * G_BLOCK_K) // GROUP, last_group) * stride_sg)
        words0, words1, box1 = _g_tile_words(w0_smem, w1_smem, ready, i, box1, W1)
        a = _g_decode(words0, words1, k0, W1, table_ptr.dtype.element_ty, A_LAYOUT)
        scale = gl.where(k0 < K, _g_scale(stored, SCALE_IS_E8M0), 0.0)
        # This tile's product alone (use_acc=False ignores acc), scaled per weight row.
        part = warpgroup_mma(a, x_smem.index(i).permute((1, 0)), acc, use_acc=False)
        acc += part * gl.expand_dims(scale, 1)
        if i + 1 < X_TILES:
            stored = stored_next
        if i + 2 < X_TILES:
            stored_next = stored_far
    for i in gl.static_range(X_TILES):
        mbarrier.invalidate(ready.index(i))

    _g_store(y_ptr, acc, offs_n, pid_m, M, N, stride_ym, stride_yn, y_ptr, y_ptr, 0, BLOCK_M, ACC, SPLIT_K, False)


# The ring kernel ("wgmma_ring", Hopper; 16 < M <= WGMMA_RING_MAX_M, see launch_config): the wgmma
# kernel's decode (_g_decode) for (BLOCK_M <= 128) x 128 tiles of x, which no longer fit in shared
# memory for a whole K split (128 x 1024 fp16 is 256 KB): they come by TMA through a ring of
# STAGES buffers, each refilled as soon as the wgmmas that read it finish; the words come by TMA
# too, through a ring of boxes, in the wgmma kernel's layout. Loaded into registers one tile
# ahead instead, they took 20-26 of the registers (250 -> 230 at BLOCK_M = 64, two row blocks;
# 183 -> 157 at 32) and left the kernel waiting on memory (ncu at M = 128: long-scoreboard stalls
# the largest); by TMA, M = 128 ran 1.07-1.30x faster on the H200 (kernels/BENCHMARKS.md). The wgmmas are
# asynchronous and accumulate in place (64 x BLOCK_M fp32, BLOCK_M / 2 registers a thread); the
# next weight tile is decoded while the tensor cores work on this one. Each decoded tile is scaled
# per row in x's dtype before its wgmma, instead of scaling the product as _lut_wgmma_kernel
# does: that would take a second BLOCK_M / 2-register accumulator and BLOCK_M / 2 FMAs a thread
# per K tile, against 32 packed multiplies (one more rounding per weight, in x's dtype; with fp16
# x, a bf16 or e8m0 scale outside fp16's range, or a product outside it, over- or underflows).
# ROW_BLOCKS = 2 decodes two 64-row blocks of W per program against each x tile, which halves the
# x tiles (32 KB at BLOCK_M = 128, five times the 6 KB of codes they meet) that the programs read
# from L2.


@gluon.jit
def _g_scaled_decode(words0, words1, stored, k0, W1: gl.constexpr, SCALE_IS_E8M0: gl.constexpr,
                     A_LAYOUT: gl.constexpr, DTYPE: gl.constexpr):
    """_g_decode's tile times its rows' scales (stored, in SliceLayout(1, A_LAYOUT)), in x's dtype, as
    the A operand (A_LAYOUT) of a wgmma."""
    a = _g_decode(words0, words1, k0, W1, DTYPE, A_LAYOUT)
    return a * gl.expand_dims(_g_scale(stored, SCALE_IS_E8M0).to(DTYPE), 1)


@gluon.jit
def _g_ring_load_box(words0_desc, words1_desc, w0_smem, w1_smem, ready, box, k_start, row0, pred,
                     T1: gl.constexpr, BOX_STAGES: gl.constexpr, ROW_BLOCKS: gl.constexpr, W1: gl.constexpr):
    """Issue the TMA loads of box `box` of a split starting at k_start (its T1 K tiles' words of the
    first plane and the box of the second plane they share, for ROW_BLOCKS blocks of 64 rows from
    row0) into stage box % BOX_STAGES of the ring kernel's words ring, all on that stage's
    barrier, if pred."""
    stage = box % BOX_STAGES
    bar = ready.index(stage)
    BYTES1: gl.constexpr = words1_desc.block_type.nbytes if W1 > 0 else 0
    mbarrier.expect(bar, ROW_BLOCKS * (T1 * words0_desc.block_type.nbytes + BYTES1), pred=pred)
    k_box = k_start + box * (T1 * G_BLOCK_K)
    for r in gl.static_range(ROW_BLOCKS):
        for i in gl.static_range(T1):
            _tma_load(words0_desc, [k_box // 64 + 2 * i, row0 + r * G_BLOCK_N, 0], bar,
                      w0_smem.index((stage * ROW_BLOCKS + r) * T1 + i), pred=pred)
        if W1 > 0:
            _tma_load(words1_desc, [k_box // (64 * T1), row0 + r * G_BLOCK_N, 0], bar,
                      w1_smem.index(stage * ROW_BLOCKS + r), pred=pred)


@gluon.jit
def _g_ring_words(w0_smem, w1_smem, ready, t, r: gl.constexpr, T1: gl.constexpr, BOX_STAGES: gl.constexpr,
                  ROW_BLOCKS: gl.constexpr, W1: gl.constexpr):
    """K tile t's words of both planes (_G_WORDS) for row block r, from the ring kernel's words
    ring once its box has arrived (_g_ring_load_box); a 2-bit plane's unshifted (_g_decode)."""
    box = t // T1
    stage = box % BOX_STAGES
    mbarrier.wait(ready.index(stage), box // BOX_STAGES & 1)
    words0 = _g_box_words(w0_smem.index((stage * ROW_BLOCKS + r) * T1 + t % T1))
    words1 = words0
    if W1 > 0:
        words1 = _g_box_words(w1_smem.index(stage * ROW_BLOCKS + r))
        if W1 == 1:
            words1 = words1 >> (t % T1 * 8)  # this tile's 8 fields at bit 0 (_g_decode)
    return words0, words1


@gluon.jit
def _lut_wgmma_ring_kernel(
    x_desc, words0_desc, words1_desc, table_ptr, scales_ptr, y_ptr, sums_ptr, arrivals_ptr,
    M, N, K, stride_sn, stride_sg, k_per_split, stride_ym, stride_yn,
    W1: gl.constexpr, GROUP: gl.constexpr, SCALE_IS_E8M0: gl.constexpr, SPLIT_K: gl.constexpr,
    TABLE_SIZE: gl.constexpr, BLOCK_M: gl.constexpr, ROW_BLOCKS: gl.constexpr, STAGES: gl.constexpr,
    BOX_STAGES: gl.constexpr,
):
    """y^T = W_hat x^T for the inputs _lut_wgmma_kernel takes, in (64 ROW_BLOCKS, BLOCK_M) blocks of
    y^T, x tiles through a ring of STAGES buffers and the words through a ring of BOX_STAGES
    boxes (the K tiles that share a box of the second plane: 2 at 6 bits, 4 at 5, 1 at 4), both by
    TMA (see the comment above). Per K tile: wgmma of row block 0 issued; [row block 1 decoded,
    its wgmma issued, row block 0's awaited]; the next K tile's row block 0 decoded; all
    awaited; the x tile's buffer refilled with the tile STAGES on, and after a box's last tile,
    its words stage with the box BOX_STAGES on. A split starts on a box (k_per_split is a
    multiple of its tiles); words past K are TMA's zeros, never used."""
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
    DTYPE: gl.constexpr = table_ptr.dtype.element_ty
    T1: gl.constexpr = _g_tiles_per_box1(W1)
    pid_m = gl.program_id(0)
    pid_n = gl.program_id(1)
    pid_k = gl.program_id(2)
    k_start = pid_k * k_per_split
    tiles = (gl.minimum(k_start + k_per_split, K) - k_start) // G_BLOCK_K
    k_last = k_start + (tiles - 1) * G_BLOCK_K
    # Row block r holds rows pid_n * 64 ROW_BLOCKS + 64 r + (0..63); rows past N are TMA's zeros
    # (their scales: row N - 1's) and are not stored.
    row0 = pid_n * (ROW_BLOCKS * G_BLOCK_N)

    w0_smem = gl.allocate_shared_memory(gl.int32, [BOX_STAGES * ROW_BLOCKS * T1, 2, G_BLOCK_N, 8],
                                        words0_desc.layout)
    w1_smem = gl.allocate_shared_memory(gl.int32, [BOX_STAGES * ROW_BLOCKS, 2, G_BLOCK_N, 8], words1_desc.layout)
    words_ready = gl.allocate_shared_memory(gl.int64, [BOX_STAGES, 1], mbarrier.MBarrierLayout())
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, G_BLOCK_K], x_desc.layout)
    x_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(BOX_STAGES):
        mbarrier.init(words_ready.index(s), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(x_ready.index(s), count=1)
    # Words first: they come from memory, x from L2.
    for s in gl.static_range(BOX_STAGES):
        _g_ring_load_box(words0_desc, words1_desc, w0_smem, w1_smem, words_ready, s, k_start, row0, s * T1 < tiles,
                         T1, BOX_STAGES, ROW_BLOCKS, W1)
    for s in gl.static_range(STAGES):
        mbarrier.expect(x_ready.index(s), x_desc.block_type.nbytes, pred=s < tiles)
        _tma_load(x_desc, [pid_m * BLOCK_M, k_start + s * G_BLOCK_K], x_ready.index(s), x_smem.index(s),
                  pred=s < tiles)

    scale_n = row0 + gl.arange(0, G_BLOCK_N, layout=gl.SliceLayout(1, A))
    scale_rows0 = scales_ptr + gl.minimum(scale_n, N - 1).to(gl.int64) * stride_sn
    stored0 = gl.load(scale_rows0 + k_start // GROUP * stride_sg)
    stored_next0 = gl.load(scale_rows0 + gl.minimum(k_start + G_BLOCK_K, k_last) // GROUP * stride_sg)
    if ROW_BLOCKS == 2:
        scale_rows1 = scales_ptr + gl.minimum(scale_n + G_BLOCK_N, N - 1).to(gl.int64) * stride_sn
        stored1 = gl.load(scale_rows1 + k_start // GROUP * stride_sg)
    _g_fill_table(table_ptr, TABLE_SIZE)
    acc0 = gl.zeros([G_BLOCK_N, BLOCK_M], gl.float32, ACC)
    acc1 = acc0
    words00, words01 = _g_ring_words(w0_smem, w1_smem, words_ready, 0, 0, T1, BOX_STAGES, ROW_BLOCKS, W1)
    a0 = _g_scaled_decode(words00, words01, stored0, k_start, W1, SCALE_IS_E8M0, A, DTYPE)
    for i in range(tiles):
        k0 = k_start + i * G_BLOCK_K
        k_next = gl.minimum(k0 + G_BLOCK_K, k_last)
        stage = i % STAGES
        mbarrier.wait(x_ready.index(stage), i // STAGES & 1)
        x_tile = x_smem.index(stage).permute((1, 0))
        acc0 = warpgroup_mma(a0, x_tile, acc0, is_async=True)
        if ROW_BLOCKS == 2:
            stored_next1 = gl.load(scale_rows1 + k_next // GROUP * stride_sg)
            words10, words11 = _g_ring_words(w0_smem, w1_smem, words_ready, i, 1, T1, BOX_STAGES, ROW_BLOCKS, W1)
            a1 = _g_scaled_decode(words10, words11, stored1, k0, W1, SCALE_IS_E8M0, A, DTYPE)
            acc1 = warpgroup_mma(a1, x_tile, acc1, is_async=True)
            acc0, a0 = warpgroup_mma_wait(1, deps=[acc0, a0])
            stored1 = stored_next1
        # The last tile decodes itself again (unused) rather than read past the split.
        stored_far0 = gl.load(scale_rows0 + gl.minimum(k0 + 2 * G_BLOCK_K, k_last) // GROUP * stride_sg)
        next00, next01 = _g_ring_words(w0_smem, w1_smem, words_ready, gl.minimum(i + 1, tiles - 1), 0, T1,
                                       BOX_STAGES, ROW_BLOCKS, W1)
        a_next = _g_scaled_decode(next00, next01, stored_next0, k_next, W1, SCALE_IS_E8M0, A, DTYPE)
        if ROW_BLOCKS == 2:
            acc1, a1 = warpgroup_mma_wait(0, deps=[acc1, a1])
        else:
            acc0, a0 = warpgroup_mma_wait(0, deps=[acc0, a0])
        a0 = a_next
        stored_next0 = stored_far0
        # Every warp's wgmmas on the x buffer and reads of the box's words (tile i + 1's row block 0
        # is already in the next box) are done before one thread refills them.
        gl.thread_barrier()
        refill = i + STAGES < tiles
        mbarrier.expect(x_ready.index(stage), x_desc.block_type.nbytes, pred=refill)
        _tma_load(x_desc, [pid_m * BLOCK_M, k0 + STAGES * G_BLOCK_K], x_ready.index(stage), x_smem.index(stage),
                  pred=refill)
        box_ahead = i // T1 + BOX_STAGES
        _g_ring_load_box(words0_desc, words1_desc, w0_smem, w1_smem, words_ready, box_ahead, k_start, row0,
                         (i % T1 == T1 - 1) & (box_ahead * T1 < tiles), T1, BOX_STAGES, ROW_BLOCKS, W1)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(x_ready.index(s))
    for s in gl.static_range(BOX_STAGES):
        mbarrier.invalidate(words_ready.index(s))

    # One row block casts its own sums (_g_store's LAST_CASTS); with two, that epilogue's registers
    # spill, and the launch's _cast_and_clear_kernel casts them instead.
    offs_n = row0 + gl.arange(0, G_BLOCK_N, layout=gl.SliceLayout(1, ACC))
    block = pid_m * gl.cdiv(N, G_BLOCK_N) + pid_n
    _g_store(y_ptr, acc0, offs_n, pid_m, M, N, stride_ym, stride_yn, sums_ptr, arrivals_ptr, block, BLOCK_M, ACC,
             SPLIT_K, ROW_BLOCKS == 1)
    if ROW_BLOCKS == 2:
        _g_store(y_ptr, acc1, offs_n + G_BLOCK_N, pid_m, M, N, stride_ym, stride_yn, sums_ptr, arrivals_ptr, block,
                 BLOCK_M, ACC, SPLIT_K, False)


@gluon.jit
def _lut_dequant_wgmma_kernel(
    words0_desc, words1_desc, table_ptr, scales_ptr, w_ptr, row0, rows, N, K, num_groups, stride_sn, stride_sg,
    stride_wn,
    W1: gl.constexpr, GROUP: gl.constexpr, SCALE_IS_E8M0: gl.constexpr, TABLE_SIZE: gl.constexpr,
    X_TILES: gl.constexpr,
):
    """Rows row0 to row0 + rows - 1 of W_hat into the panel w (row stride stride_wn, w's dtype), 64
    rows and X_TILES K tiles a program, for the inputs _lut_wgmma_kernel takes: the panel path's
    decode on Hopper. Words come by TMA as in that kernel and are decoded and scaled as the ring
    kernel's (_g_scaled_decode, in w's dtype), then stored in 16-byte vectors, a warp writing whole
    rows (_G_PANEL_STORE). Stored from the A layout instead, each warp instruction wrote 16 bytes
    in each of 8 rows, and the panel path ran at 0.55-0.89x its speed with the Triton decode (H200,
    M = 512 and 2048)."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 8, 16])
    A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    DTYPE: gl.constexpr = w_ptr.dtype.element_ty
    n0 = gl.program_id(0) * G_BLOCK_N
    k_start = gl.program_id(1) * (X_TILES * G_BLOCK_K)
    w0_smem, w1_smem, ready = _g_words_buffers(words0_desc, words1_desc, X_TILES, W1)
    for i in gl.static_range(X_TILES):
        _g_load_words(words0_desc, words1_desc, w0_smem, w1_smem, ready, i, k_start + i * G_BLOCK_K, row0 + n0, 0, W1)
    scale_rows = scales_ptr + gl.minimum(row0 + n0 + gl.arange(0, G_BLOCK_N, layout=gl.SliceLayout(1, A_LAYOUT)),
                                         N - 1).to(gl.int64) * stride_sn
    offs_n = n0 + gl.arange(0, G_BLOCK_N, layout=gl.SliceLayout(1, _G_PANEL_STORE))
    w_rows = gl.expand_dims(offs_n.to(gl.int64) * stride_wn, 1)
    in_panel = gl.expand_dims(offs_n < rows, 1)
    offs_k = gl.expand_dims(gl.arange(0, G_BLOCK_K, layout=gl.SliceLayout(0, _G_PANEL_STORE)), 0)
    _g_fill_table(table_ptr, TABLE_SIZE)
    box1 = scale_rows  # a placeholder: tile 0 loads the first box of the second plane
    for i in gl.static_range(X_TILES):
        k0 = k_start + i * G_BLOCK_K
        stored = gl.load(scale_rows + gl.minimum(k0 // GROUP, num_groups - 1) * stride_sg)
        words0, words1, box1 = _g_tile_words(w0_smem, w1_smem, ready, i, box1, W1)
        w = _g_scaled_decode(words0, words1, stored, k0, W1, SCALE_IS_E8M0, A_LAYOUT, DTYPE)
        # K is a multiple of 128 (wgmma_fits): whole tiles lie inside or past it.
        gl.store(w_ptr + w_rows + (k0 + offs_k), gl.convert_layout(w, _G_PANEL_STORE), mask=in_panel & (k0 < K))
    for i in gl.static_range(X_TILES):
        mbarrier.invalidate(ready.index(i))


@dataclass(frozen=True)
class LaunchConfig:
    """Which kernel and how it is launched. block_k must be a multiple of tile_k(bits), so every
    K tile starts on a word boundary in every plane.

    "mma" computes y directly; "mma_w" computes y^T = W_hat x^T (the weight tile as the dot's
    first operand, see _lut_mma_kernel); "wgmma" the same in Gluon (_lut_wgmma_kernel: block_m 8
    or 16, block_n 64, block_k 128, 4 warps, K splits of at most G_MAX_SPLIT_K, num_stages unused);
    "wgmma_ring" for more rows of x (_lut_wgmma_ring_kernel: block_m 16 to 128, block_n 64 or 128
    weight rows a program, block_k 128, 4 warps, num_stages x tiles in its ring); "panel" decodes
    panel_rows rows of W_hat at a time (block_n x block_k tiles) into a scratch buffer of x's
    dtype, small enough to stay in L2, and multiplies each panel with torch.matmul (cuBLAS): W_hat
    is never held whole."""

    kernel: str  # "mma", "mma_w", "wgmma", "wgmma_ring" or "panel"
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    panel_rows: int = 0


# K tiles per program of _lut_dequant_wgmma_kernel (at least one box of the second plane).
DEQUANT_TILES = 2
# Elements per program of _cast_and_clear_kernel.
CAST_BLOCK = 1024
# From PANEL_MIN_M rows of x on, the panel path (kernels/BENCHMARKS.md).
PANEL_MIN_M = 512
# Up to this many rows of x, the Gluon "wgmma" kernel where it fits (wgmma_fits): at M = 16 on the
# H200, once x's split moved into shared memory whole, it was 1.14-1.19x faster than "mma_w" on
# the four benchmark shapes that still took "mma_w" there ((4096, 4096), (11008, 4096),
# (4096, 11008), (8192, 8192); 0.91-1.06x before); it already won on the two largest, and at
# M = 1..8 (kernels/BENCHMARKS.md).
WGMMA_MAX_M = 16
# Up to this many rows of x, the Gluon "wgmma_ring" kernel where the wgmma kernel fits (wgmma_fits),
# in tiles of block_m = the smallest power of two >= M rows of x (kernels/BENCHMARKS.md).
WGMMA_RING_MAX_M = 128
# The ring kernel's launch (_ring_launch), from sweeps on the H200 at M = 32, 64, 128 on the six
# benchmark shapes (kernels/BENCHMARKS.md). Two ring stages were within 1% of three or faster, up to
# 1.4x. The time goes by whole waves of programs (as many as fit on an SM, _ring_programs_per_sm):
# the best split was the one that fills the grid closest to whole waves (one more split, a mostly
# empty second wave, cost up to 1.3x), with at least G_RING_MIN_SPLIT_K of K a split (at
# (4096, 4096), the launches that splits of 512 led to ran 0.92x as fast as those of 1024, at
# M = 32 and at 128). Where one row block (block_n 64) and two (128, sharing each x tile) fill the
# grid alike, block_m 128 takes two: its x tiles (32 KB, five times the codes they meet) are read
# from L2 once per block_n rows of W, and at (8192, 28672) two row blocks ran 1.20x faster (141
# against 169 us); smaller tiles take one.
G_RING_STAGES = 2
G_RING_MIN_SPLIT_K = 1024
# The ring kernel's words ring holds at least 2 boxes, and at least this many K tiles (2 boxes at 5
# and 6 bits, 4 at 4). Twice as many (4 boxes at 6 bits) ran 0.77-1.01x as fast at M = 32 to 128 on
# the H200 (shared memory for fewer programs per SM).
G_RING_LOOKAHEAD_TILES = 4
# K per split of the wgmma kernel (rounded up to the K tiles one box of the second plane spans: 2
# at 6 bits, 4 at 5). Short splits mean many small programs, whose loads (all issued at the start)
# keep memory busy while the others decode. On the H200, 6-bit codes, splits of 2 tiles against 4:
# at M = 1 and 4 (8-row tiles), 1.00-1.16x faster on the six benchmark shapes; at M = 16, 1.04-1.18x
# faster on four, 0.96x and 0.99x on the two largest (split-K atomics: M x N x splits sums)
# (kernels/BENCHMARKS.md).
WGMMA_SPLIT_K = 256
# Up to this many rows of x, wgmma tiles of 8 rows (m64n8k16): half the shared memory for x and
# no 16-row product for one row. With 2-tile splits on the H200 at M = 1 and 4: 1.02-1.06x faster
# than 16-row tiles on the three largest shapes, 0.98-1.01x on the others.
WGMMA_NARROW_M = 8
# Tiles of up to this many rows of x take the "mma_w" kernel: 6-9% faster than "mma" at M = 1 and
# 16 on the large H200 shapes. At M = 128 it is 5-6% slower (Triton cuts that dot into eight
# 16-wide K steps, each reading its slice of the weight tile back from shared memory), and M = 64
# was not compared in one run, so larger tiles keep "mma" (kernels/BENCHMARKS.md).
W_FIRST_MAX_BLOCK_M = 16
# Bytes of one decoded panel: inside the 50 MB L2 of an H100/H200, so cuBLAS reads it from
# there; 32 MB (fewer, larger cuBLAS calls) measured 10% faster at M = 2048 than 16 MB.
PANEL_BYTES = 32 << 20
# ... unless that panel is too narrow for cuBLAS to fill the GPU: a long K leaves few rows (576 at
# K = 28672), and an (M, rows) product of fewer output tiles than the SMs leaves most idle. Panels
# then take the rows for PANEL_MIN_WAVES waves of 128 x 128 output tiles, out of L2, up to
# PANEL_MAX_BYTES of scratch. On the H200 at (8192, 28672), M = 2048: 576 rows 0.78x fp16, 1536
# 0.85x, 4096 0.86x; M = 512: 0.55x, 0.60x, 0.66x. At K = 8192, M = 2048 the 2048 rows of 32 MB
# (1.9 waves) were 1.01-1.07x faster than 4096. Two waves rather than 1.5 (with the Gluon decode,
# three runs each, alternating in one call): M = 512 at K = 8192, 0.65-0.67x -> 0.71x and
# 0.67-0.68x -> 0.69-0.70x fp16; M = 2048 at (4096, 11008), 0.83-0.85x -> 0.89-1.00x, at
# (8192, 28672), 0.85-0.88x -> 0.87-0.92x; the other shapes within the runs' spread
# (kernels/BENCHMARKS.md).
PANEL_MIN_WAVES = 2.0
PANEL_MAX_BYTES = 128 << 20
# Panels are a multiple of this many rows: cuBLAS's output tiles span up to 256, and at (8192, 28672),
# M = 2048 a panel of 2112 rows ran at 0.85x fp16 against 0.92x for 2048 (H200, one run).
PANEL_ROWS_UNIT = 256


def panel_rows(m: int, n: int, k: int, sms: int) -> int:
    """Rows of W_hat per decoded panel for an (m, k) x (k, n) product (2-byte activations; fp32
    panels take twice the bytes): PANEL_BYTES' worth, or enough for PANEL_MIN_WAVES waves of
    cuBLAS's output tiles, within PANEL_MAX_BYTES; a multiple of PANEL_ROWS_UNIT, or all N rows
    (rounded up to 64) where that is fewer."""
    rows = PANEL_BYTES // (2 * k)
    if m * rows < PANEL_MIN_WAVES * sms * 128 * 128:
        rows = min(int(PANEL_MIN_WAVES * sms * 128 * 128) // m, PANEL_MAX_BYTES // (2 * k))
    return min(max(PANEL_ROWS_UNIT, rows // PANEL_ROWS_UNIT * PANEL_ROWS_UNIT), triton.cdiv(n, 64) * 64)


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


def _x_descriptor(x: torch.Tensor, block_m: int) -> TensorDescriptor:
    """x for the Gluon kernels' TMA loads, in tiles of block_m x 128: rows of a tile past M and
    columns past K are read as zeros."""
    block = [block_m, G_BLOCK_K.value]
    gl_dtype = gl.float16 if x.dtype == torch.float16 else gl.bfloat16
    layout = gl.NVMMASharedLayout.get_default_for(block, gl_dtype)
    return TensorDescriptor(x, list(x.shape), list(x.stride()), block, layout)


# Per (device, stream): the split-K sums (fp32) and the ring kernel's arrival counts (int32), zero
# between launches (_g_store with LAST_CASTS, _cast_and_clear_kernel): allocated zeroed once, grown
# when a launch needs more.
_SPLIT_K_WORKSPACES: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _split_k_workspace(device: torch.device, sums: int, counts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At least `sums` fp32 sums and `counts` int32 arrival counts, all zero, for a launch on the
    current stream of `device`. Launches on one stream run in order, so one workspace serves
    them all; another stream gets its own (its launches may run at the same time). Each part is
    replaced only when too small, so a launch that asks twice (the ring kernel's y, then its
    counts) keeps the sums it was given first."""
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    held = list(_SPLIT_K_WORKSPACES.get(key, (None, None)))
    for part, (size, dtype) in enumerate(((sums, torch.float32), (counts, torch.int32))):
        if held[part] is None or held[part].numel() < size:
            held[part] = torch.zeros(max(1, size), dtype=dtype, device=device)
    _SPLIT_K_WORKSPACES[key] = (held[0], held[1])
    return held[0], held[1]


def _word_descriptor(plane: torch.Tensor, n: int, row_words: int) -> TensorDescriptor:
    """A plane's (n, row_words) words for the wgmma kernel's TMA loads, as (row_words / 8, n, 8):
    eights of words (row_words is a multiple of 16) of every row, read in boxes of two eights of
    64 rows (_G_WORDS_SHAPE)."""
    return TensorDescriptor(plane, [row_words // 8, n, 8], [8, row_words, 1], [2, G_BLOCK_N.value, 8], _G_WORDS_TMA)


def _word_descriptors(words: torch.Tensor, n: int, row_words: list[int],
                      widths: tuple[int, ...]) -> list[TensorDescriptor]:
    """_word_descriptor of each plane of a 4- to 6-bit layer (one or two planes; the Gluon kernels
    take the last as the second, unused where there is one plane)."""
    first = n * row_words[0]
    planes = [words[:first]] + ([words[first:first + n * row_words[1]]] if widths[1] else [])
    return [_word_descriptor(plane, n, row_words[p]) for p, plane in enumerate(planes)]


def _ring_programs_per_sm(block_m: int, block_n: int, bits: int) -> int:
    """Ring kernel programs (128 threads) that fit in an SM's 65,536 registers, from its registers
    a thread (offline sm_90 compile, triton 3.6): at block_m 32, 125-135 with one row block (four
    programs; three at 5 bits, 135) and 154-157 with two (three); at 64 and 128, 176-255 (two).
    Their shared memory (40-88 KB) fits that many."""
    if block_m == 32:
        return 3 if block_n == 128 or bits == 5 else 4
    return 2


def _ring_launch(block_m: int, n: int, k: int, bits: int, sms: int) -> tuple[int, int]:
    """(block_n, split_k) of the ring kernel for tiles of block_m rows of x: one row block or two,
    with the split that fills whole waves of programs best; then the fewest waves; then two row
    blocks at block_m 128, one below."""
    choices = []
    for block_n in (64, 128):
        slots = _ring_programs_per_sm(block_m, block_n, bits) * sms
        tiles = triton.cdiv(n, block_n)
        split_k = max(1, min(slots // tiles, k // G_RING_MIN_SPLIT_K))
        waves = triton.cdiv(tiles * split_k, slots)
        prefer = -block_n if block_m == 128 else block_n
        choices.append((-tiles * split_k / (waves * slots), waves, prefer, block_n, split_k))
    *_, block_n, split_k = min(choices)
    return block_n, split_k


def mma_kernel(block_m: int) -> str:
    """The tensor-core kernel for tiles of block_m rows of x: "mma_w" or "mma"."""
    return "mma_w" if block_m <= W_FIRST_MAX_BLOCK_M else "mma"


def wgmma_fits(x: torch.Tensor, bits: int, group: int, k: int, words: torch.Tensor | None = None) -> bool:
    """Whether the Gluon kernel (_lut_wgmma_kernel) can take this product: a Hopper GPU, 4 to 6
    bits, fp16 or bf16 activations in rows that TMA can read (16-byte aligned), words that TMA can
    read (16-byte aligned), K a multiple of 128 and one group per K tile."""
    return (x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9 and bits in (4, 5, 6)
            and (words is None or words.data_ptr() % 16 == 0)
            and x.dtype in (torch.float16, torch.bfloat16) and k % G_BLOCK_K.value == 0
            and scale_mode(group, k, 4, G_BLOCK_K.value) == 3 and x.stride(1) == 1
            and x.stride(0) * x.element_size() % 16 == 0 and x.data_ptr() % 16 == 0)


def launch_config(m: int, n: int, k: int, bits: int, interpreted: bool, wgmma_ok: bool = True) -> LaunchConfig:
    """The configuration lut_matmul uses for an (m, k) x (k, n) product; wgmma_ok: whether the
    Gluon kernel can take it (wgmma_fits), else small M takes "mma_w" with the same blocks."""
    if interpreted:
        # The interpreter pays per program and per op, not per element: few, big tiles. A
        # 4864 x 896 6-bit layer at m = 4 cost 4.6 CPU s in tiles of 256 rows, 0.6 s in one tile.
        block_n = min(max(16, triton.next_power_of_2(n)), INTERPRETED_MAX_BLOCK_N)
        block_m = min(max(16, triton.next_power_of_2(m)), 64)
        return LaunchConfig(mma_kernel(block_m), block_m, block_n, 256)
    sms = _multiprocessors(torch.cuda.current_device())
    if m >= PANEL_MIN_M:
        return LaunchConfig("panel", 0, 64, 256, panel_rows=panel_rows(m, n, k, sms))
    block_m = min(max(16, triton.next_power_of_2(m)), 128)
    block_n = 64
    if wgmma_ok and m <= WGMMA_MAX_M:
        return LaunchConfig("wgmma", 8 if m <= WGMMA_NARROW_M else 16, block_n, 128, triton.cdiv(k, WGMMA_SPLIT_K),
                            num_warps=4)
    if wgmma_ok and m <= WGMMA_RING_MAX_M:
        # One tile of x (m <= 128 = block_m): the grid is row blocks x splits.
        ring_block_n, split_k = _ring_launch(block_m, n, k, bits, sms)
        return LaunchConfig("wgmma_ring", block_m, ring_block_n, 128, split_k, num_warps=4, num_stages=G_RING_STAGES)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    # Split K into enough programs that every SM has several waves of them to hide memory and
    # shared-memory latency (measured best on an H200 at M <= 16: 8 splits of (8192, 8192), 4 of
    # (28672, 8192) and (4096, 4096)); the 128-row tiles are bound by their register use instead
    # and take fewer. A split costs one more launch (_cast_and_clear_kernel over the fp32 sums).
    programs_per_sm = 16 if block_m <= 64 else 2
    split_k = max(1, min(8, (programs_per_sm * sms) // tiles, k // 1024))
    return LaunchConfig(mma_kernel(block_m), block_m, block_n, 128, split_k, num_warps=4, num_stages=3)


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
    The (N, G) scales may have any strides, and are read in place: groups-major
    (sopq.formats.groups_major) is the fastest on Hopper.

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

    if config is None:
        config = launch_config(m, n, k, bits, interpreted, wgmma_ok=wgmma_fits(x, bits, group, k, words))
    elif config.kernel == "wgmma_ring":
        if not wgmma_fits(x, bits, group, k, words):
            raise ValueError("the wgmma_ring kernel needs a Hopper GPU, 4 to 6 bits, fp16 or bf16 x with 16-byte "
                             "aligned rows, 16-byte aligned words, K a multiple of 128 and groups of a multiple of 128 "
                             "(or >= K)")
        if (config.block_m not in (16, 32, 64, 128) or config.block_n not in (64, 128) or config.block_k != 128
                or config.num_warps != 4 or not 2 <= config.num_stages <= 4):
            raise ValueError("the wgmma_ring kernel takes block_m 16, 32, 64 or 128, block_n 64 or 128 (row blocks of "
                             "64), block_k 128, 4 warps and 2 to 4 stages (num_stages)")
    elif config.kernel == "wgmma":
        if not wgmma_fits(x, bits, group, k, words):
            raise ValueError("the wgmma kernel needs a Hopper GPU, 4 to 6 bits, fp16 or bf16 x with 16-byte aligned "
                             "rows, 16-byte aligned words, K a multiple of 128 and groups of a multiple of 128 "
                             "(or >= K)")
        if config.block_m not in (8, 16) or (config.block_n, config.block_k, config.num_warps) != (64, 128, 4):
            raise ValueError("the wgmma kernel has fixed blocks: block_m 8 or 16, block_n 64, block_k 128, 4 warps")
        if triton.cdiv(k, config.split_k) > G_MAX_SPLIT_K:
            raise ValueError(f"the wgmma kernel keeps x for a whole K split in shared memory: split_k must be at least "
                             f"cdiv(k, {G_MAX_SPLIT_K}) = {triton.cdiv(k, G_MAX_SPLIT_K)}, got {config.split_k}")
    if config.block_k % tile_k(bits):
        raise ValueError(f"block_k must be a multiple of {tile_k(bits)} for {bits}-bit codes, got {config.block_k}")
    # The lookup table is read in its stored precision if that is fp16 (packed layers: exact, and
    # free of shared-memory bank conflicts, see _lookup), else as fp32; the interpreter gets fp32
    # (see below).
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
        MASK_K=k % config.block_k != 0, ASM=not interpreted, S=SUBCHUNK, F=32 // widths[0],
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    codebook = codebook.contiguous()
    if config.kernel == "panel":
        if config.panel_rows < 1:
            raise ValueError(f"the panel path needs panel_rows >= 1, got {config.panel_rows}")
        panel = torch.empty(min(config.panel_rows, n), k, dtype=x.dtype, device=x.device)
        # On Hopper, where the wgmma kernel could take the product, its decode (_lut_dequant_wgmma_kernel).
        gluon_decode = not interpreted and wgmma_fits(x, bits, group, k, words)
        if gluon_decode:
            word_descs = _word_descriptors(words, n, row_words, widths)
            x_tiles = max(DEQUANT_TILES, _g_tiles_per_box1(widths[1]))
            table = codebook.to(x.dtype)  # decoded in x's dtype, as in the ring kernel
        for n0 in range(0, n, panel.shape[0]):
            rows = min(panel.shape[0], n - n0)
            if gluon_decode:
                grid = (triton.cdiv(rows, G_BLOCK_N.value), triton.cdiv(k, x_tiles * G_BLOCK_K.value))
                _lut_dequant_wgmma_kernel[grid](
                    word_descs[0], word_descs[-1], table, scales, panel, n0, rows, n, k, groups, *scales.stride(),
                    panel.stride(0), W1=widths[1], GROUP=group, SCALE_IS_E8M0=scales.dtype == torch.uint8,
                    TABLE_SIZE=2**bits, X_TILES=x_tiles, num_warps=4)
            else:
                # Row n0 of every plane and of the scales: the panel is a layer of `rows` rows.
                _lut_dequant_kernel[(triton.cdiv(rows, config.block_n), triton.cdiv(k, config.block_k))](
                    words[n0 * row_words[0]:], codebook, scales[n0:], panel,
                    rows, k, groups, *scales.stride(), row_words[0], row_words[1], row_words[2],
                    plane_base1 - n0 * row_words[0] + n0 * row_words[1] if widths[1] else 0,
                    plane_base2 - n0 * row_words[0] + n0 * row_words[2] if widths[2] else 0,
                    panel.stride(0), **constants)
            torch.matmul(x, panel[:rows].T, out=out[:, n0:n0 + rows])
        return out
    # The interpreter mishandles bfloat16: its tl.dot multiplies the raw bit patterns
    # (triton-lang/triton#11584) and its fp32 -> bf16 cast truncates. So there the kernel
    # computes and stores in fp32, and torch rounds the result into `out`. Split-K programs
    # add into fp32 too: on the GPU, into the per-stream workspace, which _cast_and_clear_kernel casts
    # into `out` and leaves at zero (but for the ring kernel's of one row block, which cast their sums
    # themselves).
    ring_casts = config.kernel == "wgmma_ring" and config.block_n == G_BLOCK_N.value  # see _lut_wgmma_ring_kernel
    if config.split_k > 1 and not ring_casts:
        if interpreted:
            y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
        else:
            y = _split_k_workspace(x.device, m * n, 0)[0][:m * n].view(m, n)
    elif interpreted:
        y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    else:
        y = out
    # Each split covers whole BLOCK_K tiles.
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
    args = (x, words, codebook, scales, y, m, n, k, groups, *scales.stride(), k_per_split, *layout,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1))
    constants.update(SPLIT_K=config.split_k, BLOCK_M=config.block_m)
    splits = triton.cdiv(k, k_per_split)
    if config.kernel in ("wgmma", "wgmma_ring"):
        x_desc = _x_descriptor(x, config.block_m)
        word_descs = _word_descriptors(words, n, row_words, widths)
        # Splits of whole boxes of the second plane: both kernels load a box once for all its K tiles.
        tiles_per_box = _g_tiles_per_box1(widths[1])
        split_unit = G_BLOCK_K.value * tiles_per_box
        k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), split_unit) * split_unit
    if config.kernel == "wgmma":
        grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, G_BLOCK_N.value), triton.cdiv(k, k_per_split))
        # The codebook in x's dtype: the dot takes bare codebook values (scales multiply its result).
        _lut_wgmma_kernel[grid](x_desc, word_descs[0], word_descs[-1], codebook.to(x.dtype), scales, y, m, n, k,
                                groups, *scales.stride(), k_per_split, y.stride(0), y.stride(1), W1=widths[1],
                                GROUP=group, SCALE_IS_E8M0=scales.dtype == torch.uint8, SPLIT_K=config.split_k,
                                TABLE_SIZE=2**bits, X_TILES=k_per_split // G_BLOCK_K.value, BLOCK_M=config.block_m,
                                num_warps=4)
    elif config.kernel == "wgmma_ring":
        grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), triton.cdiv(k, k_per_split))
        # With one row block a program, the kernel writes `out` itself, split K or not (_g_store, LAST_CASTS).
        if ring_casts and grid[2] > 1 and m * n >= 2**31:
            raise ValueError(f"the wgmma_ring kernel indexes its split-K sums in 32 bits: M x N must be below 2^31, "
                             f"got {m} x {n}; split x into fewer rows per call")
        sums, arrivals = _split_k_workspace(x.device, m * n if grid[2] > 1 and ring_casts else 0,
                                            grid[0] * triton.cdiv(n, G_BLOCK_N.value))
        # The codebook in x's dtype, as for the wgmma kernel; the scales multiply the decoded tile.
        _lut_wgmma_ring_kernel[grid](x_desc, word_descs[0], word_descs[-1], codebook.to(x.dtype), scales, y, sums,
                                     arrivals, m, n, k, *scales.stride(), k_per_split, y.stride(0), y.stride(1),
                                     W1=widths[1], GROUP=group, SCALE_IS_E8M0=scales.dtype == torch.uint8,
                                     SPLIT_K=grid[2], TABLE_SIZE=2**bits, BLOCK_M=config.block_m,
                                     ROW_BLOCKS=config.block_n // G_BLOCK_N.value, STAGES=config.num_stages,
                                     BOX_STAGES=max(2, G_RING_LOOKAHEAD_TILES // tiles_per_box), num_warps=4)
    elif config.kernel in ("mma", "mma_w"):
        if min(config.block_m, config.block_n) < 16:
            raise ValueError("the mma kernel needs block_m and block_n >= 16 (tl.dot)")
        grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), splits)
        # Scaling the dot's (BLOCK_M, BLOCK_N) result costs BLOCK_M / BLOCK_K of scaling the
        # weights, plus a second accumulator: worth it for small tiles only.
        scale_dot = constants["SCALE_MODE"] == 3 and config.block_m <= 32
        _lut_mma_kernel[grid](*args, DOT_IN_FP32=interpreted, SCALE_DOT=scale_dot,
                              W_FIRST=config.kernel == "mma_w", **constants)
    else:
        raise ValueError(
            f"config.kernel must be 'mma', 'mma_w', 'wgmma', 'wgmma_ring' or 'panel', got {config.kernel!r}")
    if interpreted:
        out.copy_(y)
    elif y is not out:
        dependent = torch.cuda.get_device_capability(x.device)[0] >= 9
        _cast_and_clear_kernel[(triton.cdiv(m * n, CAST_BLOCK),)](y, out, m * n, n, out.stride(0), out.stride(1),
                                                                BLOCK=CAST_BLOCK, DEPENDENT=dependent,
                                                                launch_pdl=dependent)
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
