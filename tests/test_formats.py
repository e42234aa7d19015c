import math

import pytest
import torch

from sopq.formats import decode_scales, encode_scales, round_fp8_e4m3, sop_bpw


def test_fp8_e4m3_known_values():
    x = torch.tensor([0.0, 1.0, 1.0625, 1.1875, 448.0, 460.0, 1e6, -1e6, 2.0**-9, 2.0**-10, 0.3])
    # 1.0625 is halfway between 1.0 and 1.125: ties to even (1.0); 1.1875 -> 1.25 (even mantissa).
    # 2^-9 is the smallest subnormal; 2^-10 is halfway to 0 and rounds to even (0).
    expected = [0.0, 1.0, 1.0, 1.25, 448.0, 448.0, 448.0, -448.0, 2.0**-9, 0.0, 0.3125]
    assert round_fp8_e4m3(x).tolist() == expected


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "e8m0"])
def test_scales_roundtrip_is_idempotent(fmt):
    s = torch.tensor([1e-3, 0.37, 1.0, 3.0, 1234.5])
    once = decode_scales(encode_scales(s, fmt), fmt)
    assert torch.equal(decode_scales(encode_scales(once, fmt), fmt), once)
    assert torch.allclose(once, s, rtol=0.5 if fmt == "e8m0" else 1e-2)


def test_e8m0_stores_powers_of_two():
    stored = encode_scales(torch.tensor([1.0, 0.75, 3.0, 2.0**-20]), "e8m0")
    assert stored.dtype == torch.uint8
    # log2(0.75) = -0.415 rounds to 0 -> 1.0; log2(3) = 1.585 rounds to 2 -> 4.0
    assert decode_scales(stored, "e8m0").tolist() == [1.0, 1.0, 4.0, 2.0**-20]
    assert stored.tolist() == [127, 127, 129, 107]


def test_unknown_scale_format_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown scale format 'fp32'"):
        encode_scales(torch.ones(2), "fp32")


def test_sop_bpw_counts_codes_scales_and_codebook():
    # 6-bit codes, fp16 scale per 32 inputs, 64-entry fp16 codebook over 1024 x 1024 weights
    assert sop_bpw(6, 32, "fp16", 1024, 1024) == pytest.approx(6 + 0.5 + 16 * 64 / 1024**2)
    # a partial last group still costs a whole scale: K = 100, group 32 -> 4 groups
    assert sop_bpw(4, 32, "e8m0", 10, 100) == pytest.approx(4 + 8 * 4 / 100 + 16 * 16 / 1000)
    assert math.isclose(sop_bpw(8, 128, "bf16", 4096, 4096), 8 + 0.125 + 16 * 256 / 4096**2)
