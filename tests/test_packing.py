import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sopq import packing
from sopq.packing import dequantize, pack_codes, packed_words, unpack_codes


# The layout spelled out independently of sopq.packing (docs/packed-format.md, "Code layout").
PLANES = {4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}
SUB = 16


def pack_bit_by_bit(codes: list[list[int]], bits: int) -> list[int]:
    """Independent oracle: every code's plane fields placed one by one into Python-int words."""
    k = len(codes[0])
    words, offset = [], 0
    for width in PLANES[bits]:
        chunk = SUB * (32 // width)
        row_words = math.ceil(k / chunk) * SUB
        for row in codes:
            plane_row = [0] * row_words
            for index, code in enumerate(row):
                field = (code >> offset) & (2**width - 1)
                within = index % chunk
                word = (index // chunk) * SUB + within % SUB
                plane_row[word] |= field << ((within // SUB) * width)
            words += plane_row
        offset += width
    return [w - 2**32 if w >= 2**31 else w for w in words]


@st.composite
def code_matrices(draw):
    bits = draw(st.integers(4, 8))
    n = draw(st.integers(1, 6))
    k = draw(st.integers(1, 70))
    flat = draw(st.lists(st.integers(0, 2**bits - 1), min_size=n * k, max_size=n * k))
    return bits, [flat[r * k:(r + 1) * k] for r in range(n)]


@settings(max_examples=150, deadline=None)
@given(code_matrices())
def test_pack_matches_oracle_and_round_trips(case):
    bits, rows = case
    codes = torch.tensor(rows, dtype=torch.uint8)
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32
    assert words.tolist() == pack_bit_by_bit(rows, bits)
    assert torch.equal(unpack_codes(words, bits, tuple(codes.shape)), codes)


@pytest.mark.parametrize("bits", range(4, 9))
def test_round_trip_across_chunks(bits, monkeypatch):
    # Tiny work chunks so the chunk boundaries of pack and unpack are exercised on a small matrix.
    monkeypatch.setattr(packing, "CODES_PER_CHUNK", 200)
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (7, 597), generator=gen, dtype=torch.int64)
    words = pack_codes(codes, bits)
    assert words.tolist() == pack_bit_by_bit(codes.tolist(), bits)
    assert torch.equal(unpack_codes(words, bits, (7, 597)), codes.to(torch.uint8))


def test_known_words_4_bits():
    # Codes 0..15 of a row sit in field 0 of words 0..15, codes 16..31 in field 1, ...
    codes = torch.zeros(1, 128, dtype=torch.int64)
    codes[0, 0], codes[0, 16], codes[0, 17], codes[0, 127] = 1, 2, 3, 0xF
    words = pack_codes(codes, 4).tolist()
    assert len(words) == 16
    assert words[0] == 0x21 and words[1] == 0x30 and words[15] == 0xF0000000 - 2**32
    assert all(w == 0 for w in words[2:15])


def test_known_words_6_bits_planes():
    # 6 = 4 + 2: the low nibble goes to the 4-bit plane (16 words per row for K <= 128), the
    # top two bits to the 2-bit plane (16 words per row for K <= 256), in field 0 for k < 16.
    codes = torch.tensor([[0b110101, 0b001111]])
    words = pack_codes(codes, 6).tolist()
    assert len(words) == 32
    assert words[0] == 0b0101 and words[1] == 0b1111
    assert words[16] == 0b11 and words[17] == 0b00


def test_known_words_8_bits():
    # One 8-bit plane: 4 fields per word, codes k and k + 16 share word k.
    codes = torch.zeros(1, 20, dtype=torch.int64)
    codes[0, 0], codes[0, 16], codes[0, 19] = 0x12, 0x34, 0x9A
    words = pack_codes(codes, 8).tolist()
    assert len(words) == 16
    assert words[0] == 0x3412 and words[3] == 0x9A00


@pytest.mark.parametrize("bits", range(4, 9))
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 33), (2, 64), (11, 13)])
def test_word_count(bits, shape):
    n, k = shape
    words = pack_codes(torch.zeros(shape, dtype=torch.uint8), bits)
    assert words.numel() == packed_words(n, k, bits)
    # Exactly b bits per weight plus padding of each plane row to whole chunks.
    assert packed_words(n, k, bits) == sum(n * math.ceil(k / (16 * 32 // w)) * 16 for w in PLANES[bits])


def test_exact_bits_per_weight_on_aligned_rows():
    for bits in range(4, 9):
        assert packed_words(8, 4096, bits) * 32 == 8 * 4096 * bits


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        pack_codes(torch.tensor([[0, 16]]), 4)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        pack_codes(torch.tensor([[-1, 3]]), 6)
    for bits in (3, 9):
        with pytest.raises(ValueError, match="bits must be"):
            pack_codes(torch.tensor([[0, 1]]), bits)
    with pytest.raises(ValueError, match="integer dtype"):
        pack_codes(torch.tensor([[0.0, 1.0]]), 4)
    with pytest.raises(ValueError, match="2-D"):
        pack_codes(torch.tensor([0, 1]), 4)


def test_unpack_rejects_wrong_word_count():
    words = pack_codes(torch.ones(4, 10, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="expected 256"):
        unpack_codes(words, 5, (8, 13))
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(words[:-1], 5, (4, 10))


def test_dequantize_hand_computed_with_partial_group():
    codes = torch.tensor([[0, 1, 2, 3, 1], [3, 3, 0, 2, 0]], dtype=torch.uint8)
    codebook = torch.tensor([-1.0, 0.5, 2.0, 4.0])
    # K = 5, group = 2: groups {0, 1}, {2, 3} and the partial {4}.
    scales = torch.tensor([[1.0, 10.0, 100.0], [2.0, -1.0, 0.25]])
    expected = torch.tensor([[-1.0, 0.5, 20.0, 40.0, 50.0], [8.0, 8.0, 1.0, -2.0, -0.25]])
    result = dequantize(codes, codebook, scales, 2)
    assert result.dtype == torch.float32
    assert torch.equal(result, expected)


def test_dequantize_rejects_wrong_scale_shape():
    codes = torch.zeros(2, 5, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        dequantize(codes, torch.zeros(16), torch.ones(2, 2), 2)
