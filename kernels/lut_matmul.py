"""y = x @ W_hat^T straight from the packed codes: a Triton lookup-table matmul.

Each program computes a BLOCK_M x BLOCK_N tile of y. For every BLOCK_K slice it decodes the
codes of its BLOCK_N x BLOCK_K weight tile from their bit offsets in the dense stream
(sopq/packing.py), gathers codebook entries, multiplies by the group scale, and feeds the tile to
tl.dot with fp32 accumulation. W_hat is never materialized in memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from sopq.formats import decode_scales, num_groups
from sopq.packing import dequantize, packed_words, unpack_codes

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
def _lut_matmul_kernel(
    x_ptr, words_ptr, codebook_ptr, scales_ptr, y_ptr,
    M, N, K, num_groups,
    stride_xm, stride_xk, stride_ym, stride_yn,
    BITS: tl.constexpr, GROUP: tl.constexpr, SCALE_IS_E8M0: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # int64: n * K * BITS exceeds 2^31 for large layers.
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    code_mask = (1 << BITS) - 1

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )

        # Decode the (BLOCK_N, BLOCK_K) codes: bit offset -> word j and shift; the two words
        # j, j + 1 (guard word makes j + 1 always valid) joined in 64 bits cover any code.
        mask_w = mask_n[:, None] & mask_k[None, :]
        bit_offset = (offs_n[:, None] * K + offs_k[None, :]) * BITS
        word_index = bit_offset >> 5
        shift = bit_offset & 31
        lo = tl.load(words_ptr + word_index, mask=mask_w, other=0).to(tl.int64) & 0xFFFFFFFF
        hi = tl.load(words_ptr + word_index + 1, mask=mask_w, other=0).to(tl.int64)
        codes = (((hi << 32) | lo) >> shift) & code_mask

        # Masked loads keep padding at exactly 0 (a NaN codebook entry must not leak into
        # padding, and a real NaN must reach y).
        values = tl.load(codebook_ptr + codes, mask=mask_w, other=0.0)
        stored = tl.load(
            scales_ptr + offs_n[:, None] * num_groups + offs_k[None, :] // GROUP,
            mask=mask_w, other=0,
        )
        if SCALE_IS_E8M0:
            scale = tl.exp2(stored.to(tl.float32) - 127.0)
        else:
            scale = stored.to(tl.float32)
        w = values * scale
        # fp32 activations (and the interpreter, see lut_matmul) get a true fp32 product, not TF32.
        if DOT_IN_FP32 or x.dtype == tl.float32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))

    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _block_sizes(m: int, interpreted: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K). tl.dot needs every block >= 16."""
    block_m = min(max(16, triton.next_power_of_2(m)), 64)
    if interpreted:
        # The interpreter pays per program and per op, not per element: few, big tiles.
        return block_m, 512, 128
    return block_m, 64, 64


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
) -> torch.Tensor:
    """y = x @ W_hat^T, (M, N) in x's dtype, from packed codes and stored scales; fp32 accumulation."""
    interpreted = isinstance(_lut_matmul_kernel, InterpretedFunction)
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

    # The interpreter mishandles bfloat16: its tl.dot multiplies the raw bit patterns
    # (triton-lang/triton#11584) and its fp32 -> bf16 cast truncates. So there the kernel
    # computes and stores in fp32, and torch rounds the result into `out`.
    y = torch.empty(m, n, dtype=torch.float32, device=x.device) if interpreted else out
    block_m, block_n, block_k = _block_sizes(m, interpreted)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _lut_matmul_kernel[grid](
        x, words, codebook.to(torch.float32).contiguous(), scales.contiguous(), y,
        m, n, k, groups,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        BITS=bits, GROUP=group, SCALE_IS_E8M0=scales.dtype == torch.uint8,
        DOT_IN_FP32=interpreted,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
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
