import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sopq import packing
from sopq.packing import dequantize, pack_codes, packed_words, unpack_codes


def pack_bit_by_bit(codes: list[list[int]], bits: int) -> list[int]:
    """Independent oracle: the stream as one Python integer, split into int32 words."""
    flat = [c for row in codes for c in row]
    stream = 0
    for i, code in enumerate(flat):
        stream |= code << (i * bits)
    n_words = math.ceil(len(flat) * bits / 32) + 1
    words = [(stream >> (32 * j)) & 0xFFFFFFFF for j in range(n_words)]
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
    # Tiny chunks so the chunk boundaries of pack and unpack are exercised on a small matrix.
    monkeypatch.setattr(packing, "BLOCKS_PER_CHUNK", 3)
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (7, 97), generator=gen, dtype=torch.int64)
    words = pack_codes(codes, bits)
    assert words.tolist() == pack_bit_by_bit(codes.tolist(), bits)
    assert torch.equal(unpack_codes(words, bits, (7, 97)), codes.to(torch.uint8))


def test_known_words_4_bits():
    assert pack_codes(torch.tensor([[1, 2, 3]]), 4).tolist() == [0x321, 0]
    # No per-row padding: row 1 continues right after row 0 in the same word.
    assert pack_codes(torch.tensor([[1, 2, 3], [4, 5, 6]]), 4).tolist() == [0x654321, 0]


def test_known_words_6_bits_straddling():
    # Code 5 (value 63 = 0b111111) sits at bits 30..35: its low two bits end word 0,
    # its high four bits (0b1111) start word 1.
    words = pack_codes(torch.tensor([[1, 2, 3, 4, 5, 63]]), 6)
    word0 = 0x1 | (2 << 6) | (3 << 12) | (4 << 18) | (5 << 24) | (0b11 << 30)
    assert word0 == 0xC5103081
    assert words.tolist() == [0xC5103081 - 2**32, 0xF, 0]


def test_known_words_8_bits():
    words = pack_codes(torch.tensor([[0x12, 0x34, 0x56, 0x78, 0x9A]]), 8)
    assert words.tolist() == [0x78563412, 0x9A, 0]


@pytest.mark.parametrize("bits", range(4, 9))
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 33), (2, 64), (11, 13)])
def test_word_count(bits, shape):
    n, k = shape
    words = pack_codes(torch.zeros(shape, dtype=torch.uint8), bits)
    assert words.numel() == packed_words(n, k, bits) == math.ceil(n * k * bits / 32) + 1
    assert words[-1].item() == 0


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
    with pytest.raises(ValueError, match="expected 10"):
        unpack_codes(words, 5, (4, 13))
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
