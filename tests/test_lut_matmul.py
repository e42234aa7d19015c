"""lut_matmul against the float64 reference; without a GPU, conftest.py puts Triton in interpreter mode."""
import dataclasses
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from kernels import lut_matmul, reference_lut_matmul
from kernels.lut_matmul import (
    _SPLIT_K_WORKSPACES, CAST_BLOCK, G_RING_MIN_SPLIT_K, PANEL_BYTES, PANEL_MAX_BYTES, PANEL_ROWS_UNIT, LaunchConfig,
    _cast_and_clear_kernel, _ring_launch, _ring_programs_per_sm, launch_config, panel_rows, scale_mode, tile_k,
    wgmma_fits,
)
from sopq.formats import encode_scales, groups_major, num_groups
from sopq.packing import PLANE_WIDTHS, pack_codes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
SCALE_FORMATS = {"fp16": torch.float16, "bf16": torch.bfloat16, "e8m0": torch.uint8}
ACTIVATIONS = [torch.float16, torch.bfloat16, torch.float32]
# (M, N, K): most not a multiple of the block sizes (interpreter blocks are M x up to 4096 rows x
# 256, GPU blocks 16..128 x 64 x 128), with N > 4096 and K > 256 to cross block and
# plane-chunk boundaries; (4, 50, 512) and (24, 20, 768) have K a multiple of 256 (no masks on
# K). Every M here takes a tensor-core kernel: up to M = 16 "mma_w" (M = 1 in a tile of 16 rows),
# above it "mma".
SHAPES = [(1, 37, 100), (5, 70, 129), (17, 300, 530), (33, 130, 64), (8, 3, 300), (2, 96, 40), (4, 50, 512),
          (24, 20, 768), (3, 4100, 200)]
GROUPS = [32, 64, 128, None]  # None: one group spanning all of K


def make_layer(n, k, bits, group, scale_format, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    codebook = torch.randn(2**bits, generator=gen)
    scales = torch.rand(n, num_groups(k, group), generator=gen) * 2 + 0.05
    return codes, pack_codes(codes, bits), codebook, encode_scales(scales, scale_format)


def relative_error(y, y_ref):
    return ((y.cpu().double() - y_ref).norm() / y_ref.norm()).item()


CASES = [
    (bits, scale_format, dtype, SHAPES[i % len(SHAPES)], group)
    for i, (bits, scale_format, dtype, group) in enumerate(
        itertools.product(range(4, 9), SCALE_FORMATS, ACTIVATIONS, GROUPS)
    )
]


@pytest.mark.parametrize("bits, scale_format, dtype, shape, group", CASES)
def test_matches_reference(bits, scale_format, dtype, shape, group):
    m, n, k = shape
    group = group or k
    _, words, codebook, scales = make_layer(n, k, bits, group, scale_format, seed=bits * 100 + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    args = dict(bits=bits, group=group, n=n, k=k)
    y = lut_matmul(x.to(DEVICE), words.to(DEVICE), codebook.to(DEVICE), scales.to(DEVICE), out=out, **args)
    assert y is out and y.dtype == dtype and y.shape == (m, n)
    assert torch.isfinite(y).all()
    y_ref = reference_lut_matmul(x, words, codebook, scales, **args)
    assert relative_error(y, y_ref) < 1e-2


# Explicit launch configurations: every kernel, small blocks (many programs), K tiles of one and
# of several words per plane row, split-K (atomics), panels that do not divide N.
CONFIG_CASES = [
    (LaunchConfig("mma", 16, 16, 1, split_k=1), (1, 50, 700)),
    (LaunchConfig("mma", 16, 32, 2, split_k=3), (1, 40, 1100)),
    (LaunchConfig("mma", 16, 16, 4, split_k=2), (1, 33, 1300)),
    (LaunchConfig("mma", 16, 16, 1, split_k=1), (3, 50, 700)),
    (LaunchConfig("mma", 16, 16, 1, split_k=1), (20, 45, 600)),
    (LaunchConfig("mma", 32, 32, 2, split_k=2), (2, 70, 1100)),
    (LaunchConfig("mma_w", 16, 64, 1, split_k=2), (1, 70, 700)),
    (LaunchConfig("mma_w", 32, 16, 2, split_k=1), (20, 45, 600)),
    (LaunchConfig("panel", 0, 16, 2, panel_rows=24), (9, 70, 600)),
]


@pytest.mark.parametrize("bits", [5, 6, 8])
@pytest.mark.parametrize("config, shape", CONFIG_CASES)
def test_explicit_configs_match_reference(bits, config, shape):
    m, n, k = shape
    # block_k above is in units of tile_k(bits); one pipeline stage keeps shared memory small.
    config = dataclasses.replace(config, block_k=config.block_k * tile_k(bits), num_stages=1)
    _, words, codebook, scales = make_layer(n, k, bits, 64, "e8m0", seed=bits + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(torch.float16)
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device=DEVICE)
    args = dict(bits=bits, group=64, n=n, k=k)
    lut_matmul(x.to(DEVICE), words.to(DEVICE), codebook.to(DEVICE), scales.to(DEVICE), out=out, config=config, **args)
    assert torch.isfinite(out).all()
    assert relative_error(out, reference_lut_matmul(x, words, codebook, scales, **args)) < 1e-2


# (group, block_k in units of tile_k(6) = 128) -> how the kernels read scales (scale_mode): 3 one
# per K tile (several groups per row, and one group for the whole row), 2 one per 128-code chunk,
# 1 one per 16-code sub-chunk, 0 one per weight.
SCALE_MODE_CASES = [((256, 1), 3), ((256, 2), 3), ((600, 2), 3), ((128, 2), 2), ((32, 1), 1), ((24, 1), 0)]


# The mma kernels scale the dot's result (mode 3, block_m <= 32) or the weights (block_m 64).
KERNELS = [("mma", 16), ("mma", 64), ("mma_w", 16), ("mma_w", 64), ("panel", 0)]


@pytest.mark.parametrize("kernel, block_m", KERNELS)
@pytest.mark.parametrize("group_block, mode", SCALE_MODE_CASES)
def test_every_scale_mode(kernel, block_m, group_block, mode):
    group, block = group_block
    n, k, m, bits = 40, 600, 3, 6
    assert scale_mode(group, k, PLANE_WIDTHS[bits][0], block * tile_k(bits)) == mode
    _, words, codebook, scales = make_layer(n, k, bits, group, "bf16", seed=group + block)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(group)).half()
    config = LaunchConfig(kernel, block_m, 16, block * tile_k(bits), split_k=1 if kernel == "panel" else 2,
                          num_stages=1, panel_rows=24)
    args = dict(bits=bits, group=group, n=n, k=k)
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device=DEVICE)
    lut_matmul(x.to(DEVICE), words.to(DEVICE), codebook.to(DEVICE), scales.to(DEVICE), out=out, config=config, **args)
    assert relative_error(out, reference_lut_matmul(x, words, codebook, scales, **args)) < 1e-2


@pytest.mark.parametrize("group", [40, 24])
def test_groups_that_are_not_a_multiple_of_16(group):
    # Scales looked up per weight (a sub-tile of 16 codes spans two groups).
    n, k, m, bits = 30, 300, 2, 6
    _, words, codebook, scales = make_layer(n, k, bits, group, "fp16", seed=group)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5))
    args = dict(bits=bits, group=group, n=n, k=k)
    y = lut_matmul(x.to(DEVICE), words.to(DEVICE), codebook.to(DEVICE), scales.to(DEVICE), **args)
    assert relative_error(y, reference_lut_matmul(x, words, codebook, scales, **args)) < 1e-4


def test_fp16_codebook_as_stored():
    # Packed layers store the codebook in fp16; the kernel reads it as it is.
    n, k, m, bits, group = 33, 200, 4, 6, 32
    _, words, codebook, scales = make_layer(n, k, bits, group, "bf16", seed=11)
    codebook = codebook.half()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(6)).half()
    args = dict(bits=bits, group=group, n=n, k=k)
    y = lut_matmul(x.to(DEVICE), words.to(DEVICE), codebook.to(DEVICE), scales.to(DEVICE), **args)
    assert relative_error(y, reference_lut_matmul(x, words, codebook, scales, **args)) < 1e-2


def test_reference_matches_dense_product():
    # Guards the oracle itself: codes, codebook and scales decoded by hand.
    codes = torch.tensor([[0, 1, 2], [3, 3, 1]])
    codebook = torch.linspace(-1, 1, 16)
    scales = torch.tensor([[2.0, 0.5], [1.0, 4.0]], dtype=torch.float16)
    x = torch.tensor([[1.0, 2.0, 3.0]])
    w_hat = torch.stack([
        torch.stack([2.0 * codebook[0], 2.0 * codebook[1], 0.5 * codebook[2]]),
        torch.stack([1.0 * codebook[3], 1.0 * codebook[3], 4.0 * codebook[1]]),
    ])
    y_ref = reference_lut_matmul(x, pack_codes(codes, 4), codebook, scales, bits=4, group=2, n=2, k=3)
    assert torch.allclose(y_ref, (x @ w_hat.T).double(), atol=1e-6)


def test_strided_x_and_fresh_output():
    n, k, m, bits, group = 45, 96, 6, 6, 32
    _, words, codebook, scales = make_layer(n, k, bits, group, "bf16", seed=7)
    x = torch.randn(k, m, generator=torch.Generator().manual_seed(1)).T  # not contiguous
    args = dict(bits=bits, group=group, n=n, k=k)
    y = lut_matmul(x.to(DEVICE), words.to(DEVICE), codebook.to(DEVICE), scales.to(DEVICE), **args)
    assert relative_error(y, reference_lut_matmul(x, words, codebook, scales, **args)) < 1e-4


def test_split_k_sums_reach_a_strided_out_and_nothing_else():
    # Split-K sums reach `out` through its strides (on the GPU by _cast_and_clear_kernel, in the
    # interpreter by a copy): a column slice of a wider buffer, whose other columns stay as they
    # were, and a transposed view.
    n, k, m, bits, group = 40, 256, 5, 6, 128
    _, words, codebook, scales = make_layer(n, k, bits, group, "fp16", seed=11)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3))
    args = dict(bits=bits, group=group, n=n, k=k, config=LaunchConfig("mma", 16, 16, 128, split_k=2))
    inputs = [t.to(DEVICE) for t in (x, words, codebook, scales)]
    y_ref = reference_lut_matmul(x, words, codebook, scales, bits=bits, group=group, n=n, k=k)
    wide = torch.full((m, n + 7), float("nan"), device=DEVICE)
    lut_matmul(*inputs, out=wide[:, 3:3 + n], **args)
    assert relative_error(wide[:, 3:3 + n], y_ref) < 1e-4
    assert torch.isnan(wide[:, :3]).all() and torch.isnan(wide[:, 3 + n:]).all()
    transposed = torch.full((n, m), float("nan"), device=DEVICE).T
    lut_matmul(*inputs, out=transposed, **args)
    assert relative_error(transposed, y_ref) < 1e-4


def test_nan_in_codebook_reaches_output():
    n, k, m, bits, group = 20, 70, 3, 5, 32
    codes, words, codebook, scales = make_layer(n, k, bits, group, "fp16", seed=3)
    poisoned = codes[0, 5].item()
    codebook[poisoned] = float("nan")
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    y = lut_matmul(x.to(DEVICE), words.to(DEVICE), codebook.to(DEVICE), scales.to(DEVICE),
                   bits=bits, group=group, n=n, k=k).cpu()
    uses_poisoned = (codes == poisoned).any(dim=1)
    assert torch.isnan(y[:, uses_poisoned]).all()
    assert torch.isfinite(y[:, ~uses_poisoned]).all()


def test_unused_nan_codebook_entry_does_not_leak_from_padding():
    # Padding lanes (K and N past the end) decode as code 0; a NaN there must not reach y.
    n, k, m, bits, group = 21, 77, 2, 4, 32
    codes = torch.randint(1, 2**bits, (n, k), generator=torch.Generator().manual_seed(4))
    codebook = torch.randn(2**bits)
    codebook[0] = float("nan")
    scales = encode_scales(torch.ones(n, num_groups(k, group)), "e8m0")
    x = torch.randn(m, k)
    y = lut_matmul(x.to(DEVICE), pack_codes(codes, bits).to(DEVICE), codebook.to(DEVICE), scales.to(DEVICE),
                   bits=bits, group=group, n=n, k=k)
    assert torch.isfinite(y).all()


def test_rejects_bad_input():
    n, k, bits, group = 8, 40, 6, 32
    _, words, codebook, scales = (t.to(DEVICE) for t in make_layer(n, k, bits, group, "fp16", seed=0))
    x = torch.randn(2, k, device=DEVICE)
    args = dict(bits=bits, group=group, n=n, k=k)
    with pytest.raises(ValueError, match="packed_words"):
        lut_matmul(x, words[:-1], codebook, scales, **args)
    with pytest.raises(ValueError, match="stored scale format"):
        lut_matmul(x, words, codebook, scales.float(), **args)
    with pytest.raises(ValueError, match="shape"):
        lut_matmul(x[:, :-1], words, codebook, scales, **args)
    with pytest.raises(ValueError, match="block_k must be a multiple of 128"):
        lut_matmul(x, words, codebook, scales, config=LaunchConfig("mma", 16, 16, 64), **args)
    with pytest.raises(ValueError, match="out must be"):
        lut_matmul(x, words, codebook, scales, out=torch.empty(2, n, dtype=torch.float16, device=DEVICE), **args)
    with pytest.raises(ValueError, match="'mma', 'mma_w', 'wgmma', 'wgmma_ring' or 'panel'"):
        lut_matmul(x, words, codebook, scales, config=LaunchConfig("gemv", 1, 16, 256), **args)


# The Gluon kernel ("wgmma", Hopper only: the interpreter cannot run Gluon): every width it takes,
# both activation dtypes and scale formats, tiles of 8 and 16 rows of x, M up to 16 and past it
# (several tiles), N not a multiple of 64, one group per row (group None), and split-K (with a
# short last split, whose tiles past K the kernel computes on zeros and scales by 0).
WGMMA_SHAPES = [(1, 70, 512), (16, 130, 1024), (5, 64, 256), (33, 100, 384)]
WGMMA_CASES = [
    (bits, scale_format, dtype, WGMMA_SHAPES[i % len(WGMMA_SHAPES)], [128, None][i % 2], 1 + i % 3, [16, 8][i // 2 % 2])
    for i, (bits, scale_format, dtype) in enumerate(
        itertools.product([4, 5, 6], SCALE_FORMATS, [torch.float16, torch.bfloat16]))
]


@pytest.mark.skipif(not HOPPER, reason="the wgmma kernel needs a Hopper GPU")
@pytest.mark.parametrize("bits, scale_format, dtype, shape, group, split_k, block_m", WGMMA_CASES)
def test_wgmma_kernel_matches_reference(bits, scale_format, dtype, shape, group, split_k, block_m):
    assert_gluon_kernel_matches_reference(LaunchConfig("wgmma", block_m, 64, 128, split_k=split_k), bits, scale_format,
                                          dtype, shape, group)


# The panel path decodes with _lut_dequant_wgmma_kernel wherever the wgmma kernel fits: the same
# cases, in panels of 64 rows (N = 70, 100 and 130 end with a partial one; K = 384 with a K tile
# past K in the last program).
@pytest.mark.skipif(not HOPPER, reason="the panel path's Gluon decode needs a Hopper GPU")
@pytest.mark.parametrize("bits, scale_format, dtype, shape, group", [case[:5] for case in WGMMA_CASES])
def test_panel_gluon_decode_matches_reference(bits, scale_format, dtype, shape, group):
    m, n, k = shape
    assert wgmma_fits(torch.empty(m, k, dtype=dtype, device=DEVICE), bits, group or k, k)
    assert_gluon_kernel_matches_reference(LaunchConfig("panel", 0, 64, 256, panel_rows=64), bits, scale_format, dtype,
                                          shape, group)


@pytest.mark.skipif(not HOPPER, reason="the panel path's Gluon decode needs a Hopper GPU")
def test_panel_gluon_decode_is_exact_on_small_integers():
    # Power-of-two scales times small integers are exact in fp16, so every decoded weight is.
    assert_exact(LaunchConfig("panel", 0, 64, 256, panel_rows=64),
                 *small_integer_product(100, 128, 5, power_of_two_scales(5)))


def assert_gluon_kernel_matches_reference(config, bits, scale_format, dtype, shape, group):
    """lut_matmul with this configuration of a Gluon kernel: finite everywhere (outputs start as
    NaN) and within 1e-2 of the float64 reference; group None is one group per row."""
    m, n, k = shape
    group = group or k
    _, words, codebook, scales = make_layer(n, k, bits, group, scale_format, seed=bits * 10 + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    args = dict(bits=bits, group=group, n=n, k=k)
    lut_matmul(x.to(DEVICE), words.to(DEVICE), codebook.to(DEVICE), scales.to(DEVICE), out=out, config=config, **args)
    assert torch.isfinite(out).all()
    assert relative_error(out, reference_lut_matmul(x, words, codebook, scales, **args)) < 1e-2


def small_integer_product(m, x_period, seed, scales):
    """Inputs of a (m, 512) x (512, 130) 6-bit product that fp16 computes exactly: the codes
    enumerate all 4096 (even k, odd k) code pairs (each 8 times or more, both halves of every 2-bit
    plane word), the codebook holds distinct small integers, and row i of x sums the weights at
    k = i mod x_period. With scales of 1 or powers of two, every sum is an integer below 2^11 (times
    the scale): any wrong code, swapped pair or misplaced field changes some output, where a
    relative-error bound could let a few slip through. Returns (x, words, codebook, scales, args)."""
    n, k = 130, 512
    pair = (torch.arange(n * k // 2) % 4096).view(n, k // 2)
    codes = torch.stack([pair % 64, pair // 64], dim=2).reshape(n, k)
    codebook = (torch.randperm(64, generator=torch.Generator().manual_seed(seed)) - 32).half()
    x = (torch.arange(k)[None, :] % x_period == torch.arange(m)[:, None]).half()
    return x, pack_codes(codes, 6), codebook, scales, dict(bits=6, group=128, n=n, k=k)


def assert_exact(config, x, words, codebook, scales, args):
    out = torch.full((x.shape[0], args["n"]), float("nan"), dtype=torch.float16, device=DEVICE)
    lut_matmul(x.to(DEVICE), words.to(DEVICE), codebook.to(DEVICE), scales.to(DEVICE), out=out, config=config, **args)
    assert torch.equal(out.cpu().double(), reference_lut_matmul(x, words, codebook, scales, **args))


@pytest.mark.skipif(not HOPPER, reason="the wgmma kernel needs a Hopper GPU")
@pytest.mark.parametrize("split_k, block_m", [(1, 16), (2, 16), (3, 8)])
def test_wgmma_kernel_is_exact_on_small_integers(split_k, block_m):
    assert_exact(LaunchConfig("wgmma", block_m, 64, 128, split_k=split_k),
                 *small_integer_product(16, 16, split_k, torch.ones(130, 4, dtype=torch.float16)))


@pytest.mark.skipif(not HOPPER, reason="the wgmma kernel needs a Hopper GPU")
def test_wgmma_kernel_splits_long_k():
    # The kernel holds x for a whole K split in shared memory (at most 1024 of K): the automatic
    # configuration splits a longer K into enough pieces, and an explicit one that does not is refused.
    m, n, k = 3, 70, 2304
    _, words, codebook, scales = (t.to(DEVICE) for t in make_layer(n, k, 6, 128, "fp16", seed=5))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5)).half()
    args = dict(bits=6, group=128, n=n, k=k)
    config = launch_config(m, n, k, 6, interpreted=False)
    assert config.kernel == "wgmma" and config.split_k >= 3
    y = lut_matmul(x.to(DEVICE), words, codebook, scales, **args)
    assert relative_error(y, reference_lut_matmul(x, words.cpu(), codebook.cpu(), scales.cpu(), **args)) < 1e-2
    with pytest.raises(ValueError, match="split_k must be at least cdiv"):
        lut_matmul(x.to(DEVICE), words, codebook, scales, config=LaunchConfig("wgmma", 16, 64, 128, split_k=2), **args)


# The ring kernel ("wgmma_ring", Hopper only): every width, both activation dtypes and scale
# formats, M not a multiple of block_m (a partial last tile, and several tiles), N not a multiple
# of 64 (nor of 128 with two row blocks), one group per row (group None), split K (with a short
# last split, and splits shorter than the ring), and every ring depth.
RING_SHAPES = [(100, 130, 1024), (33, 70, 640), (17, 200, 384), (130, 64, 512)]
RING_CASES = [
    (bits, scale_format, dtype, RING_SHAPES[i % len(RING_SHAPES)], [128, None][i % 2], 1 + i % 3,
     [(128, 64, 3), (64, 128, 2), (32, 64, 4), (128, 128, 2), (16, 64, 4), (64, 64, 3)][i % 6])
    for i, (bits, scale_format, dtype) in enumerate(
        itertools.product([4, 5, 6], SCALE_FORMATS, [torch.float16, torch.bfloat16]))
]


@pytest.mark.skipif(not HOPPER, reason="the wgmma_ring kernel needs a Hopper GPU")
@pytest.mark.parametrize("bits, scale_format, dtype, shape, group, split_k, blocks", RING_CASES)
def test_wgmma_ring_kernel_matches_reference(bits, scale_format, dtype, shape, group, split_k, blocks):
    block_m, block_n, stages = blocks
    config = LaunchConfig("wgmma_ring", block_m, block_n, 128, split_k=split_k, num_stages=stages)
    assert_gluon_kernel_matches_reference(config, bits, scale_format, dtype, shape, group)


@pytest.mark.skipif(not HOPPER, reason="the wgmma_ring kernel needs a Hopper GPU")
@pytest.mark.parametrize("bits, split_k", [(4, 1), (5, 1), (5, 2), (6, 2)])
def test_wgmma_ring_kernel_refills_its_words_ring(bits, split_k):
    # Splits of 7 to 19 K tiles (K = 2432): the words ring (boxes of 1, 4 or 2 tiles at 4, 5 and 6
    # bits) is refilled several times, and some splits end on part of a box.
    config = LaunchConfig("wgmma_ring", 64, 128, 128, split_k=split_k, num_stages=2)
    assert_gluon_kernel_matches_reference(config, bits, "fp16", torch.float16, (40, 130, 2432), 128)


def power_of_two_scales(seed):
    return (2.0 ** torch.randint(-2, 3, (130, 4), generator=torch.Generator().manual_seed(seed))).half()


@pytest.mark.skipif(not HOPPER, reason="the wgmma_ring kernel needs a Hopper GPU")
@pytest.mark.parametrize("block_m, block_n, split_k", [(128, 64, 1), (128, 128, 2), (64, 128, 3), (32, 64, 2)])
def test_wgmma_ring_kernel_is_exact_on_small_integers(block_m, block_n, split_k):
    # 100 rows of x (row i sums the weights at k = i mod 128, four of them) and power-of-two
    # scales, so that scaling the decoded weights in fp16 is exact too.
    assert_exact(LaunchConfig("wgmma_ring", block_m, block_n, 128, split_k=split_k, num_stages=3),
                 *small_integer_product(100, 128, split_k, power_of_two_scales(1)))


@pytest.mark.skipif(not HOPPER, reason="the Gluon kernels need a Hopper GPU")
def test_split_k_leaves_the_workspace_at_zero():
    # Split-K programs add into per-stream fp32 sums that stay zero between launches
    # (_split_k_workspace): the ring kernel's last program of each 64-row block casts them into y
    # and sets them, and its arrival count, back to zero; the other kernels' launches end with
    # _cast_and_clear_kernel. Launches of every kernel, shape and block in turn, on two streams,
    # each exact (sums left over would add to the next), and every workspace zero after each.
    # (The sixth needs more arrival counts than any before it: the counts grow, the sums stay.)
    launches = [("wgmma_ring", 100, 64, 128, 3), ("wgmma_ring", 50, 128, 128, 4), ("wgmma", 16, 16, 64, 4),
                ("wgmma_ring", 17, 32, 64, 2), ("wgmma", 3, 8, 64, 2), ("wgmma_ring", 100, 16, 128, 2),
                ("mma", 40, 64, 64, 2), ("wgmma_ring", 100, 64, 128, 3)]
    for stream in (torch.cuda.current_stream(), torch.cuda.Stream()):
        with torch.cuda.stream(stream):
            for seed, (kernel, m, block_m, block_n, split_k) in enumerate(launches):
                # fp16 scales the decoded weights exactly in the ring kernel when they are powers of two.
                assert_exact(LaunchConfig(kernel, block_m, block_n, 128, split_k=split_k, num_stages=2),
                             *small_integer_product(m, 128, seed, power_of_two_scales(seed)))
                stream.synchronize()
                for sums, arrivals in _SPLIT_K_WORKSPACES.values():
                    assert not sums.any() and not arrivals.any()
    assert len(_SPLIT_K_WORKSPACES) >= 2  # one per stream


_COMPILE_CAST_KERNEL = """
import importlib
import triton
from triton.backends.compiler import GPUTarget
L = importlib.import_module("kernels.lut_matmul")
kernel = L._cast_and_clear_kernel
signature = dict(sums_ptr="*fp32", out_ptr="*fp16", numel="i32", N="i32", stride_om="i32", stride_on="i32",
                 BLOCK="constexpr", DEPENDENT="constexpr")
for capability, dependent in ((80, False), (90, True)):
    constexprs = {(kernel.arg_names.index("BLOCK"),): L.CAST_BLOCK, (kernel.arg_names.index("DEPENDENT"),): dependent}
    compiled = triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs=constexprs),
                              target=GPUTarget("cuda", capability, 32), options=dict(num_warps=4))
    print(capability, "griddepcontrol.wait" in compiled.asm["ptx"])
"""


def test_cast_kernel_compiles_for_gpus_before_hopper():
    # lut_matmul launches the split-K cast as a programmatic dependent launch on sm_90 and later
    # only: griddepcontrol (gdc_wait) does not assemble for an A100 (sm_80). Compiled offline, in a
    # process without the interpreter; no GPU needed.
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_CAST_KERNEL], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["80", "False", "90", "True"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the race needs a GPU's warps running at once")
def test_cast_and_clear_reads_every_sum_before_zeroing_it():
    # Triton lays out the kernel's load and its zeroing store differently, so other warps zero the
    # sums a warp reads: on the H200, without a barrier between them, some of 64 x 40960 sums were
    # zeroed before they were read (a ring launch at two row blocks and split K lost 1e-2 of y).
    m, n = 64, 40960
    generator = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(3):
        sums = torch.randn(m * n, generator=generator, device="cuda")
        expected = sums.half().view(m, n)
        out = torch.empty(m, n, dtype=torch.float16, device="cuda")
        _cast_and_clear_kernel[(triton.cdiv(m * n, CAST_BLOCK),)](sums, out, m * n, n, out.stride(0), out.stride(1),
                                                                BLOCK=CAST_BLOCK, DEPENDENT=HOPPER)
        assert torch.equal(out, expected)
        assert not sums.any()


@pytest.mark.skipif(not HOPPER, reason="the wgmma_ring kernel needs a Hopper GPU")
def test_wgmma_ring_kernel_is_the_automatic_choice_above_16_rows():
    n, k = 200, 2048
    _, words, codebook, scales = (t.to(DEVICE) for t in make_layer(n, k, 6, 128, "fp16", seed=7))
    args = dict(bits=6, group=128, n=n, k=k)
    for m in (17, 64, 128):
        config = launch_config(m, n, k, 6, interpreted=False)
        assert config.kernel == "wgmma_ring" and config.block_m >= m
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half()
        y = lut_matmul(x.to(DEVICE), words, codebook, scales, **args)
        assert relative_error(y, reference_lut_matmul(x, words.cpu(), codebook.cpu(), scales.cpu(), **args)) < 1e-2
    assert launch_config(16, n, k, 6, interpreted=False).kernel == "wgmma"


@pytest.mark.skipif(not HOPPER, reason="the wgmma_ring kernel needs a Hopper GPU")
@pytest.mark.parametrize("config", [LaunchConfig("wgmma_ring", 48, 64, 128), LaunchConfig("wgmma_ring", 64, 192, 128),
                                    LaunchConfig("wgmma_ring", 64, 64, 256), LaunchConfig("wgmma_ring", 64, 64, 128,
                                                                                          num_stages=1)])
def test_wgmma_ring_kernel_rejects_bad_blocks(config):
    n, k, m = 70, 512, 40
    _, words, codebook, scales = (t.to(DEVICE) for t in make_layer(n, k, 6, 128, "fp16", seed=1))
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="wgmma_ring kernel takes"):
        lut_matmul(x, words, codebook, scales, bits=6, group=128, n=n, k=k, config=config)


# Scales in any strides: groups-major (groups_major, as PackedLinear holds them) and every other
# column of a wider tensor give the product of the row-major scales. On CPU the mma kernel (scales
# per tile, per chunk at group 32) and the panel path; on a Hopper GPU the automatic kernels, wgmma
# at M = 1 and 16, the ring kernel at 64 and the panel path at 600. Split-K sums may add in another
# order, hence a tolerance far below the error of a scale read from the wrong place (scales of 0.05
# to 2.05).
@pytest.mark.parametrize("m, group, panel", [(1, 128, False), (16, 128, False), (64, 128, False), (600, 128, False),
                                             (5, 32, False), (5, 128, True)])
def test_scales_in_any_strides_give_the_same_product(m, group, panel):
    n, k = 200, 1024
    _, words, codebook, scales = (t.to(DEVICE) for t in make_layer(n, k, 6, group, "fp16", seed=3))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half().to(DEVICE)
    config = LaunchConfig("panel", 0, 64, 256, panel_rows=128) if panel else None
    args = dict(bits=6, group=group, n=n, k=k, config=config)
    row_major = lut_matmul(x, words, codebook, scales, **args)
    assert relative_error(row_major, reference_lut_matmul(x.cpu(), words.cpu(), codebook.cpu(), scales.cpu(),
                                                          **{a: args[a] for a in ("bits", "group", "n", "k")})) < 1e-2
    wide = torch.zeros(n, 2 * scales.shape[1], dtype=scales.dtype, device=DEVICE)
    wide[:, ::2] = scales
    for layout in (groups_major(scales), wide[:, ::2]):
        assert not layout.is_contiguous() and torch.equal(layout, scales)
        torch.testing.assert_close(lut_matmul(x, words, codebook, layout, **args), row_major, rtol=2e-3, atol=2e-3)


def test_ring_launch_fills_one_wave_of_the_programs_that_fit():
    # Every split keeps G_RING_MIN_SPLIT_K of K, and splitting never starts a second wave of
    # programs (as many as fit on the 132 SMs); the swept best where the two block_n differ most:
    # two row blocks at block_m 128 on (8192, 28672), four programs of one row block an SM at
    # block_m 32 (three at 5 bits), and no splits of 512 at K = 4096.
    for block_m in (32, 64, 128):
        for bits in (4, 5, 6):
            for n, k in [(4096, 4096), (11008, 4096), (8192, 28672), (28672, 8192), (100, 1024), (40960, 8192)]:
                block_n, split_k = _ring_launch(block_m, n, k, bits, 132)
                slots = _ring_programs_per_sm(block_m, block_n, bits) * 132
                assert block_n in (64, 128)
                assert split_k == 1 or (k // split_k >= G_RING_MIN_SPLIT_K and -(-n // block_n) * split_k <= slots)
    assert _ring_launch(128, 8192, 28672, 6, 132) == (128, 4)
    assert _ring_launch(32, 8192, 8192, 6, 132) == (64, 4)
    assert _ring_launch(32, 8192, 8192, 5, 132) == (64, 3)
    assert _ring_launch(32, 4096, 4096, 6, 132) == (64, 4)


def test_panel_rows_fill_the_gpu_within_the_scratch_bound():
    # K = 8192, M = 2048: two waves of output tiles take 2112 rows, a multiple of 256 is 2048, an
    # L2-sized panel (32 MB); a long K widens the panel past L2 (576 rows would be 72 tiles for
    # 132 SMs), never past PANEL_MAX_BYTES; rows are a multiple of PANEL_ROWS_UNIT, or all N rows
    # rounded up to 64 where that is fewer.
    assert panel_rows(2048, 8192, 8192, 132) * 2 * 8192 == PANEL_BYTES
    wide = panel_rows(2048, 8192, 28672, 132)
    assert wide > PANEL_BYTES // (2 * 28672) and wide * 2 * 28672 <= PANEL_MAX_BYTES
    assert panel_rows(512, 8192, 28672, 132) * 2 * 28672 <= PANEL_MAX_BYTES
    for m, n, k in [(512, 100, 4096), (2048, 4096, 11008), (600, 33000, 1024)]:
        rows = panel_rows(m, n, k, 132)
        assert rows % PANEL_ROWS_UNIT == 0 or rows == -(-n // 64) * 64
        assert 64 <= rows <= -(-n // 64) * 64


@pytest.mark.parametrize("bits, k, group", [(7, 512, 128), (6, 600, 128), (6, 512, 64)])
def test_wgmma_kernel_rejects_what_it_cannot_take(bits, k, group):
    # 7 bits, K not a multiple of 128, two groups in a K tile; on CPU nothing fits.
    n, m = 40, 2
    _, words, codebook, scales = (t.to(DEVICE) for t in make_layer(n, k, bits, group, "fp16", seed=1))
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
    assert not wgmma_fits(x, bits, group, k)
    with pytest.raises(ValueError, match="wgmma kernel needs"):
        lut_matmul(x, words, codebook, scales, bits=bits, group=group, n=n, k=k,
                   config=LaunchConfig("wgmma", 16, 64, 128))
    with pytest.raises(ValueError, match="wgmma_ring kernel needs"):
        lut_matmul(x, words, codebook, scales, bits=bits, group=group, n=n, k=k,
                   config=LaunchConfig("wgmma_ring", 64, 64, 128))
