"""The packed code layout: exactly `bits` bits per weight in a dense little-endian bitstream.

The code with row-major index i = n * K + k occupies bits [i * bits, (i + 1) * bits) of the
stream, least significant bit first, stored in int32 words (word j holds stream bits
[32 j, 32 j + 32)). The stream is zero-padded to whole words plus one zero guard word, so a
reader may always load words j and j + 1 to decode a code that straddles a word boundary.
Both the pack stage and the kernel use this module, so this is the one definition.
"""
from __future__ import annotations

import math

import torch

from sopq.formats import num_groups

PACK_FORMAT_VERSION = 1
MIN_BITS, MAX_BITS = 4, 8

# 32 codes of b bits fill exactly b words, so the stream is a sequence of identical
# 32-code blocks and packing loops over 32 positions, vectorized over blocks.
CODES_PER_BLOCK = 32
# Blocks per chunk: bounds the int64 working set to ~64 MB however big the layer is.
BLOCKS_PER_CHUNK = 1 << 18
_WORD_MASK = 0xFFFFFFFF


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


def packed_words(n: int, k: int, bits: int) -> int:
    """Number of int32 words holding an n x k code matrix: ceil(n k bits / 32) + 1 guard word."""
    _check_bits(bits)
    return math.ceil(n * k * bits / 32) + 1


def _block_layout(bits: int):
    """For each position c in a 32-code block: (word, shift, whether it spills into word + 1)."""
    layout = []
    for c in range(CODES_PER_BLOCK):
        offset = c * bits
        word, shift = divmod(offset, 32)
        layout.append((word, shift, shift + bits > 32))
    return layout


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack an integer (N, K) code matrix with values in [0, 2^bits) into the dense int32 stream."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D (N, K) tensor, got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    n, k = codes.shape
    flat = codes.detach().reshape(-1).cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(
            f"codes must lie in [0, {2**bits}) for bits={bits}, got range "
            f"[{int(flat.min())}, {int(flat.max())}]"
        )
    total_words = packed_words(n, k, bits)
    layout = _block_layout(bits)
    chunk_codes = BLOCKS_PER_CHUNK * CODES_PER_BLOCK
    chunks = []
    for start in range(0, flat.numel(), chunk_codes):
        part = flat[start:start + chunk_codes].to(torch.int64)
        part = torch.nn.functional.pad(part, (0, -part.numel() % CODES_PER_BLOCK))
        blocks = part.view(-1, CODES_PER_BLOCK)
        words = torch.zeros(blocks.shape[0], bits, dtype=torch.int64)
        for c, (word, shift, spills) in enumerate(layout):
            words[:, word] |= (blocks[:, c] << shift) & _WORD_MASK
            if spills:
                words[:, word + 1] |= blocks[:, c] >> (32 - shift)
        chunks.append(words.view(-1))
    # Zero padding of the last block only adds zero words; trim to the stream, add the guard.
    stream = torch.cat(chunks + [torch.zeros(0, dtype=torch.int64)])[: total_words - 1]
    stream = torch.cat([stream, torch.zeros(total_words - stream.numel(), dtype=torch.int64)])
    # Reinterpret unsigned 32-bit values as int32 (two's complement) explicitly.
    return torch.where(stream >= 2**31, stream - 2**32, stream).to(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of pack_codes: the (N, K) uint8 code matrix stored in `words`."""
    _check_bits(bits)
    n, k = shape
    if words.dim() != 1 or words.dtype != torch.int32:
        raise ValueError(f"words must be a 1-D int32 tensor, got {words.dtype} of shape {tuple(words.shape)}")
    expected = packed_words(n, k, bits)
    if words.numel() != expected:
        raise ValueError(
            f"{words.numel()} packed words do not match an {n} x {k} matrix at {bits} bits "
            f"(expected {expected}); check the shape and bits recorded with the codes"
        )
    total = n * k
    layout = _block_layout(bits)
    unsigned = words.detach().cpu().to(torch.int64) & _WORD_MASK
    mask = 2**bits - 1
    chunk_words = BLOCKS_PER_CHUNK * bits
    chunks = []
    for start in range(0, unsigned.numel(), chunk_words):
        part = unsigned[start:start + chunk_words]
        part = torch.nn.functional.pad(part, (0, -part.numel() % bits))
        blocks = part.view(-1, bits)
        codes = torch.empty(blocks.shape[0], CODES_PER_BLOCK, dtype=torch.int64)
        for c, (word, shift, spills) in enumerate(layout):
            value = blocks[:, word] >> shift
            if spills:
                value |= blocks[:, word + 1] << (32 - shift)
            codes[:, c] = value & mask
        chunks.append(codes.view(-1))
    flat = torch.cat(chunks + [torch.zeros(0, dtype=torch.int64)])[:total]
    return flat.to(torch.uint8).view(n, k)


def dequantize(codes: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """The quantized weight W_hat[n, k] = scales[n, k // group] * codebook[codes[n, k]], float32 (N, K)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D (N, K) tensor, got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be a positive integer, got {group!r}")
    groups = num_groups(k, group)
    if tuple(scales.shape) != (n, groups):
        raise ValueError(
            f"scales must have shape (N, ceil(K / group)) = ({n}, {groups}) for K={k}, "
            f"group={group}; got {tuple(scales.shape)}"
        )
    if codebook.dim() != 1:
        raise ValueError(f"codebook must be 1-D, got shape {tuple(codebook.shape)}")
    values = codebook.to(torch.float32)[codes.long()]
    per_weight_scale = scales.to(torch.float32).repeat_interleave(group, dim=1)[:, :k]
    return per_weight_scale * values
