"""y = x @ W_hat^T straight from the packed codes: Triton lookup-table matmuls.

Both kernels decode a (BLOCK_N, BLOCK_K) weight tile the same way (_decode_tile): whole int32
words of each bit plane (sopq/packing.py) are loaded, split into fields by constant shifts,
joined into codes, looked up in the codebook and multiplied by their group scale. W_hat is
never materialized in memory.

- _lut_gemv_kernel (small M): each program owns BLOCK_N output columns and one K split, and
  reduces x * w on the CUDA cores; the time is the weight bytes, so it only has to stream them.
- _lut_mma_kernel (larger M): (BLOCK_M, BLOCK_N) output tiles on the tensor cores (tl.dot with
  fp32 accumulation); the decode is paid once per tile and shared by BLOCK_M rows of x.
With split_k > 1 the programs add their partial sums into an fp32 buffer with atomics.
lut_matmul picks the kernel and launch configuration from M (launch_config).
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
def _plane_fields(codes_ptr, plane_base, row_words, offs_n, mask_n, k_sub,
                  WIDTH: tl.constexpr, S: tl.constexpr):
    """(BLOCK_N, S) fields of one bit plane for the S codes k_sub .. k_sub + S of rows offs_n.

    k_sub is a multiple of S; the chunk holding it is S words, and these codes are its field
    (k_sub / S) mod (32 / WIDTH) (sopq/packing.py)."""
    PER_WORD: tl.constexpr = 32 // WIDTH
    cols = (k_sub // (S * PER_WORD)) * S + tl.arange(0, S)
    words = tl.load(codes_ptr + plane_base + offs_n[:, None] * row_words + cols[None, :],
                    mask=mask_n[:, None] & (cols < row_words)[None, :], other=0)
    return (words >> (((k_sub // S) % PER_WORD) * WIDTH)) & ((1 << WIDTH) - 1)


@triton.jit
def _decode_subtile(codes_ptr, codebook_ptr, scales_ptr, offs_n, mask_n, k_sub, K, num_groups,
                    row_words0, row_words1, row_words2, plane_base1, plane_base2,
                    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                    GROUP: tl.constexpr, SCALE_PER_WEIGHT: tl.constexpr, SCALE_IS_E8M0: tl.constexpr,
                    S: tl.constexpr):
    """W_hat[offs_n, k_sub : k_sub + S] in fp32; exactly 0 outside the matrix."""
    offs_k = k_sub + tl.arange(0, S)
    mask_k = offs_k < K
    codes = _plane_fields(codes_ptr, 0, row_words0, offs_n, mask_n, k_sub, W0, S)
    if W1 > 0:
        codes |= _plane_fields(codes_ptr, plane_base1, row_words1, offs_n, mask_n, k_sub, W1, S) << W0
    if W2 > 0:
        codes |= _plane_fields(codes_ptr, plane_base2, row_words2, offs_n, mask_n, k_sub, W2, S) << (W0 + W1)
    # Masked lookup keeps padding at exactly 0 (a NaN codebook entry must not leak into
    # padding, and a real NaN must reach y).
    values = tl.load(codebook_ptr + codes, mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
    if SCALE_PER_WEIGHT:
        # Groups that are not a multiple of S: one scale load per weight.
        stored = tl.load(scales_ptr + offs_n[:, None] * num_groups + (offs_k // GROUP)[None, :],
                         mask=mask_n[:, None] & mask_k[None, :], other=0)
    else:
        # The S codes lie in one group: one scale per row (none past K: 0 * inf would be NaN).
        stored = tl.load(scales_ptr + offs_n * num_groups + k_sub // GROUP, mask=mask_n & (offs_n * 0 + k_sub < K), other=0)[:, None]
    if SCALE_IS_E8M0:
        scale = tl.exp2(stored.to(tl.float32) - 127.0)
    else:
        scale = stored.to(tl.float32)
    return values * scale


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
    S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    # int64: row offsets times row lengths exceed 2^31 for large layers.
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    # Products stay elementwise per (row of x, column, lane) and are reduced once at the end.
    acc = tl.zeros((BLOCK_M, BLOCK_N, S), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        for c in tl.static_range(BLOCK_K // S):
            k_sub = k0 + c * S
            w = _decode_subtile(codes_ptr, codebook_ptr, scales_ptr, offs_n, mask_n, k_sub, K, num_groups,
                                row_words0, row_words1, row_words2, plane_base1, plane_base2,
                                W0, W1, W2, GROUP, SCALE_PER_WEIGHT, SCALE_IS_E8M0, S)
            offs_k = k_sub + tl.arange(0, S)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
            acc += x[:, None, :] * w[None, :, :]
    _store_or_add(y_ptr, tl.sum(acc, axis=2), offs_m, offs_n, M, N, stride_ym, stride_yn, SPLIT_K)


@triton.jit
def _lut_mma_kernel(
    x_ptr, codes_ptr, codebook_ptr, scales_ptr, y_ptr,
    M, N, K, num_groups, k_per_split,
    row_words0, row_words1, row_words2, plane_base1, plane_base2,
    stride_xm, stride_xk, stride_ym, stride_yn,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    GROUP: tl.constexpr, SCALE_PER_WEIGHT: tl.constexpr, SCALE_IS_E8M0: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Programs that share a weight tile (same pid_n) are adjacent, so its bytes come from L2.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        for c in tl.static_range(BLOCK_K // S):
            k_sub = k0 + c * S
            offs_k = k_sub + tl.arange(0, S)
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
                        mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)
            w = _decode_subtile(codes_ptr, codebook_ptr, scales_ptr, offs_n, mask_n, k_sub, K, num_groups,
                                row_words0, row_words1, row_words2, plane_base1, plane_base2,
                                W0, W1, W2, GROUP, SCALE_PER_WEIGHT, SCALE_IS_E8M0, S)
            # fp32 activations (and the interpreter, see lut_matmul) get a true fp32 product, not TF32.
            if DOT_IN_FP32 or x.dtype == tl.float32:
                acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    _store_or_add(y_ptr, acc, offs_m, offs_n, M, N, stride_ym, stride_yn, SPLIT_K)


@dataclass(frozen=True)
class LaunchConfig:
    """Which kernel and how it is launched. block_k must be a multiple of every plane's chunk
    (tile_k(bits)), so a K tile starts on a chunk boundary in every plane."""

    kernel: str  # "gemv" or "mma"
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


# Largest M that takes the GEMV kernel; above it the tensor cores win (kernels/BENCHMARKS.md).
GEMV_MAX_M = 4
# Rows per program in the interpreter: a layer of up to this many rows is one program; larger
# ones (qwen2's 4864-row MLP layers) still take several, with a partial last tile.
INTERPRETED_MAX_BLOCK_N = 4096


def tile_k(bits: int) -> int:
    """The smallest legal block_k for these bits: the largest plane chunk, at least 128."""
    return max(128, *(plane_chunk(width) for width in PLANE_WIDTHS[bits]))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_config(m: int, n: int, k: int, bits: int, interpreted: bool) -> LaunchConfig:
    """The configuration lut_matmul uses for an (m, k) x (k, n) product."""
    block_k = tile_k(bits)
    if interpreted:
        # The interpreter pays per program and per op, not per element: few, big tiles. A
        # 4864 x 896 6-bit layer at m = 4 costs 4.6 CPU s in tiles of 256 rows, 0.6 s in one tile.
        block_n = min(max(16, triton.next_power_of_2(n)), INTERPRETED_MAX_BLOCK_N)
        if m <= GEMV_MAX_M:
            return LaunchConfig("gemv", triton.next_power_of_2(m), block_n, block_k)
        return LaunchConfig("mma", min(max(16, triton.next_power_of_2(m)), 64), block_n, block_k)
    sms = _multiprocessors(torch.cuda.current_device())
    if m <= GEMV_MAX_M:
        block_n = 32
        tiles = triton.cdiv(n, block_n)
        # Enough programs in flight to keep every SM streaming weights.
        split_k = max(1, min(8, (4 * sms) // tiles, k // (4 * block_k)))
        return LaunchConfig("gemv", triton.next_power_of_2(m), block_n, block_k, split_k, num_warps=4, num_stages=3)
    block_m = min(max(16, triton.next_power_of_2(m)), 128)
    block_n = 128 if m > 64 else 64
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = max(1, min(8, (2 * sms) // tiles, k // (4 * block_k)))
    num_warps = 8 if block_m >= 128 else 4
    # The pipeliner stages every sub-tile of a K tile: at block_k = 512 (5 and 7 bits) three
    # stages asked for 393 KB of shared memory on an H200 (limit 227 KB), so those get one.
    num_stages = 3 if block_k <= 256 else 1
    return LaunchConfig("mma", block_m, block_n, block_k, split_k, num_warps=num_warps, num_stages=num_stages)


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
    # The lookup table is read in its stored precision (fp16 for packed layers: half the bytes
    # per gather); the interpreter gets fp32 (see above).
    if interpreted or codebook.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        codebook = codebook.to(torch.float32)
    widths = PLANE_WIDTHS[bits] + (0,) * (3 - len(PLANE_WIDTHS[bits]))
    row_words = [plane_row_words(k, w) if w else 0 for w in widths]
    plane_base1 = n * row_words[0]
    plane_base2 = plane_base1 + n * row_words[1]
    # Each split covers whole BLOCK_K tiles.
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
    constants = dict(
        W0=widths[0], W1=widths[1], W2=widths[2], GROUP=group,
        SCALE_PER_WEIGHT=not (group % SUBCHUNK == 0 or group >= k), SCALE_IS_E8M0=scales.dtype == torch.uint8,
        SPLIT_K=config.split_k, S=SUBCHUNK,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    args = (
        x, words, codebook.contiguous(), scales.contiguous(), y,
        m, n, k, groups, k_per_split, *row_words, plane_base1, plane_base2,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
    )
    splits = triton.cdiv(k, k_per_split)
    if config.kernel == "gemv":
        if config.block_m < m:
            raise ValueError(f"the gemv kernel needs block_m >= M = {m}, got {config.block_m}")
        _lut_gemv_kernel[(triton.cdiv(n, config.block_n), splits)](*args, **constants)
    elif config.kernel == "mma":
        if min(config.block_m, config.block_n) < 16:
            raise ValueError("the mma kernel needs block_m and block_n >= 16 (tl.dot)")
        grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), splits)
        _lut_mma_kernel[grid](*args, DOT_IN_FP32=interpreted, **constants)
    else:
        raise ValueError(f"config.kernel must be 'gemv' or 'mma', got {config.kernel!r}")
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
