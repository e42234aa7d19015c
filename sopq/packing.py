"""The packed code layout: `bits`-bit codes split into bit planes of 4, 2 and 1 bits (8: one plane).

A code of b bits is stored as planes of widths PLANE_WIDTHS[b] (4 = 4, 5 = 4 + 1, 6 = 4 + 2,
7 = 4 + 2 + 1, 8 = 8), least significant plane first: code = p0 | p1 << w0 | p2 << (w0 + w1).
Every plane width divides 32, so a kernel loads whole aligned int32 words of each plane and
splits them with constant shifts.

Within a plane of width w (32 / w fields per word), each row is cut into chunks of
SUBCHUNK * 32 / w codes, the last one zero-padded. A chunk is SUBCHUNK words; field i of its
word j holds code chunk_start + i * SUBCHUNK + j. So the SUBCHUNK consecutive codes
[chunk_start + i * SUBCHUNK, chunk_start + (i + 1) * SUBCHUNK) are field i of the chunk's
SUBCHUNK words, for every plane: a kernel gets a (rows, SUBCHUNK) tile of codes from one
(rows, SUBCHUNK) tile of words per plane, with no reshuffling between threads.
A plane is an (N, chunks * SUBCHUNK) int32 matrix, row-major; the stored tensor is the planes
flattened and concatenated in order. That is exactly b bits per weight when K is a multiple of
every plane's chunk (64 codes at 8 bits, 128 at 4, 256 at 6, 512 at 5 and 7), a little more
otherwise. Both the pack stage and the kernels use this module, so this is the one definition
(docs/packed-format.md, "Code layout", describes it for readers).
"""
from __future__ import annotations

import math

import torch

from sopq.formats import num_groups

PACK_FORMAT_VERSION = 2
MIN_BITS, MAX_BITS = 4, 8
PLANE_WIDTHS = {4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}
# Consecutive codes that share the same field of consecutive words (see above).
SUBCHUNK = 16
# Codes per chunk of work: bounds the int64 working set to ~64 MB however big the layer is.
CODES_PER_CHUNK = 1 << 23
_WORD_MASK = 0xFFFFFFFF


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


def plane_chunk(width: int) -> int:
    """Codes per chunk in a plane of this width: SUBCHUNK words of 32 / width fields."""
    return SUBCHUNK * (32 // width)


def plane_row_words(k: int, width: int) -> int:
    """int32 words per row in a plane of this width."""
    return math.ceil(k / plane_chunk(width)) * SUBCHUNK


def packed_words(n: int, k: int, bits: int) -> int:
    """Number of int32 words holding an n x k code matrix: every plane's rows, concatenated."""
    _check_bits(bits)
    return sum(n * plane_row_words(k, width) for width in PLANE_WIDTHS[bits])


def _row_chunks(n: int, k: int):
    rows = max(1, CODES_PER_CHUNK // max(k, 1))
    return [(start, min(start + rows, n)) for start in range(0, n, rows)]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack an integer (N, K) code matrix with values in [0, 2^bits) into the bit-plane int32 words."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D (N, K) tensor, got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    n, k = codes.shape
    codes = codes.detach().cpu()
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(
            f"codes must lie in [0, {2**bits}) for bits={bits}, got range "
            f"[{int(codes.min())}, {int(codes.max())}]"
        )
    planes, offset = [], 0
    for width in PLANE_WIDTHS[bits]:
        per_word = 32 // width
        row_codes = plane_row_words(k, width) * per_word
        shifts = (torch.arange(per_word, dtype=torch.int64) * width)[:, None]
        for start, stop in _row_chunks(n, k):
            part = torch.nn.functional.pad(codes[start:stop].to(torch.int64), (0, row_codes - k))
            fields = ((part >> offset) & (2**width - 1)).view(stop - start, -1, per_word, SUBCHUNK)
            planes.append((fields << shifts).sum(dim=2).reshape(-1))
        offset += width
    stream = torch.cat(planes + [torch.zeros(0, dtype=torch.int64)])
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
    unsigned = words.detach().cpu().to(torch.int64) & _WORD_MASK
    codes = torch.zeros(n, k, dtype=torch.uint8)
    plane_start, offset = 0, 0
    for width in PLANE_WIDTHS[bits]:
        per_word = 32 // width
        row_words = plane_row_words(k, width)
        plane = unsigned[plane_start:plane_start + n * row_words].view(n, -1, 1, SUBCHUNK)
        shifts = (torch.arange(per_word, dtype=torch.int64) * width)[:, None]
        for start, stop in _row_chunks(n, k):
            fields = ((plane[start:stop] >> shifts) & (2**width - 1)).reshape(stop - start, -1)[:, :k]
            codes[start:stop] |= (fields << offset).to(torch.uint8)
        plane_start += n * row_words
        offset += width
    return codes


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
    return per_weight(scales.to(torch.float32), group, k) * values


def per_weight(scales: torch.Tensor, group: int, k: int) -> torch.Tensor:
    """(N, G) group scales repeated to one per weight, (N, K)."""
    return scales.repeat_interleave(group, dim=1)[:, :k]
