import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sopq.metrics import layer_errors
from sopq.quantize import nearest_code, quantize_layer, weighted_codebook


def weighted_sse(values, weights, codebook):
    q = nearest_code(values, codebook)
    return (weights * (values - codebook[q]) ** 2).sum().item()


def brute_force_sse(values, weights, size):
    """Best weighted SSE over every partition of the sorted distinct values into contiguous runs."""
    order = values.argsort()
    v, w = values[order], weights[order]
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(v)), size - 1):
        bounds = (0, *cuts, len(v))
        sse = 0.0
        for a, b in zip(bounds, bounds[1:]):
            mean = (w[a:b] * v[a:b]).sum() / w[a:b].sum()
            sse += (w[a:b] * (v[a:b] - mean) ** 2).sum().item()
        best = min(best, sse)
    return best


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.integers(-100, 100), min_size=5, max_size=9, unique=True),
    weights=st.lists(st.floats(0.1, 10.0), min_size=9, max_size=9),
    size=st.integers(2, 4),
)
def test_codebook_matches_brute_force(values, weights, size):
    # Distinct integers span at most 200, so with 256 histogram bins (width < 1) each lands in a
    # bin of its own, where the dynamic programme is exact.
    v = torch.tensor(values, dtype=torch.float64) / 100
    w = torch.tensor(weights[: len(values)], dtype=torch.float64)
    codebook = weighted_codebook(v, w, size)
    assert codebook.shape == (size,)
    assert torch.all(codebook[1:] >= codebook[:-1])
    assert weighted_sse(v, w, codebook) <= brute_force_sse(v, w, size) * (1 + 1e-9) + 1e-12


def test_codebook_weights_pull_entries():
    # Two clusters; the heavy point at 1.0 must get an entry of its own.
    v = torch.tensor([0.0, 0.1, 0.2, 1.0])
    w = torch.tensor([1.0, 1.0, 1.0, 100.0])
    codebook = weighted_codebook(v, w, 2)
    assert torch.allclose(codebook, torch.tensor([0.1, 1.0], dtype=torch.float64))


def test_codebook_with_fewer_distinct_values_than_entries():
    codebook = weighted_codebook(torch.tensor([0.5, 0.5, -0.5]), torch.ones(3), 4)
    assert codebook.shape == (4,)
    assert set(codebook.tolist()) == {-0.5, 0.5}


def test_all_zero_weights_is_a_clear_error():
    with pytest.raises(ValueError, match="every weight is zero"):
        weighted_codebook(torch.randn(10), torch.zeros(10), 4)


def correlated_layer(n=64, k=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g)
    X = torch.randn(2048, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    return W, (X.T @ X / X.shape[0]).double()


@pytest.mark.parametrize("scale_format", ["fp16", "bf16", "e8m0"])
def test_quantize_layer_shapes_and_error_falls_with_bits(scale_format):
    W, H = correlated_layer()
    errors = []
    for bits in (4, 5, 6, 7, 8):
        q = quantize_layer(W, H, bits, 32, scale_format)
        assert q.codes.shape == W.shape and q.codes.dtype == torch.uint8
        assert int(q.codes.max()) < 2**bits
        assert q.codebook.shape == (2**bits,) and q.codebook.dtype == torch.float16
        assert q.scales.shape == (64, 3)
        errors.append(layer_errors(W, q.dequantize(), H)["e_out"])
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # 4 bits on Gaussian weights with group-32 scales: relative output error of a few percent.
    assert 1e-3 < errors[0] < 0.05


def test_error_feedback_lowers_output_error():
    W, H = correlated_layer(seed=1)
    plain = quantize_layer(W, H, 4, 32, "fp16", error_feedback=False)
    feedback = quantize_layer(W, H, 4, 32, "fp16", error_feedback=True)
    e_plain = layer_errors(W, plain.dequantize(), H)["e_out"]
    e_feedback = layer_errors(W, feedback.dequantize(), H)["e_out"]
    assert e_feedback < 0.8 * e_plain


def test_partial_last_group_and_row_scales():
    W, H = correlated_layer(n=8, k=40)
    q = quantize_layer(W, H, 6, 32, "fp16")
    assert q.scales.shape == (8, 2)
    row = quantize_layer(W, H, 6, 1000, "fp16")  # larger than K: one scale per row
    assert row.group == 40 and row.scales.shape == (8, 1)


def test_zero_layer_and_nan_layer():
    W, H = correlated_layer(n=4, k=32)
    q = quantize_layer(torch.zeros_like(W), H, 6, 32, "fp16")
    assert torch.equal(q.dequantize(), torch.zeros_like(W))
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_layer(W.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan"))), H, 6, 32, "fp16")


def test_quantize_is_deterministic():
    W, H = correlated_layer()
    a, b = quantize_layer(W, H, 6, 32, "fp16"), quantize_layer(W, H, 6, 32, "fp16")
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebook, b.codebook) and torch.equal(a.scales, b.scales)
