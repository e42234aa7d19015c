import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sopq.metrics import layer_errors
from sopq.formats import decode_scales
from sopq.packing import per_weight
from sopq.quantize import (
    E4M3_VALUES,
    NearestCode,
    _contiguous_clusters,
    _fp8_codebook,
    _output_error_change,
    fit_scales_and_codebook,
    gptq_round,
    inverse_cholesky,
    quantize_layer,
    weighted_codebook,
    without_error_feedback,
)


def weighted_sse(values, weights, codebook):
    q = NearestCode(codebook)(values)
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


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(-100, 100), min_size=5, max_size=11, unique=True),
    weights=st.lists(st.floats(0.1, 10.0), min_size=11, max_size=11),
    size=st.integers(2, 6),
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


def reference_clusters(c0, c1, c2, size):
    """Plain O(bins^2 * size) DP: every start of the last run tried for every prefix."""
    m = c0.size - 1
    a, b = np.arange(m + 1)[:, None], np.arange(m + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.maximum((c2[b] - c2[a]) - (c1[b] - c1[a]) ** 2 / (c0[b] - c0[a]), 0)
    cost = np.where(a < b, cost, np.inf)
    best, splits = cost[0], []
    for _ in range(1, size):
        splits.append((best[:, None] + cost).argmin(0))
        best = (best[:, None] + cost).min(0)
    edges = [m]
    for split in reversed(splits):
        edges.append(int(split[edges[-1]]))
    return np.array([0, *edges[::-1]])


def run_sse(c0, c1, c2, edges):
    a, b = edges[:-1], edges[1:]
    return float(np.sum((c2[b] - c2[a]) - (c1[b] - c1[a]) ** 2 / (c0[b] - c0[a])))


def random_histogram(rng, kind, bins):
    centers = np.sort(rng.uniform(-1, 1, bins))
    if kind == "gaussian":
        mass = np.exp(-(centers**2) * 8) * rng.uniform(0.5, 1.5, bins)
    elif kind == "heavy_tail":
        mass = 1 / (1 + (centers * 20) ** 2) ** 2 * rng.uniform(0.5, 1.5, bins)
    elif kind == "gaps":  # a few dense lumps and near-empty bins between them
        mass = rng.exponential(size=bins) * (rng.uniform(size=bins) < 0.3) + 1e-9
    else:  # equal weights on an even grid: many exact ties between partitions
        centers, mass = np.linspace(-1, 1, bins), np.ones(bins)
    spread = rng.uniform(0, 1e-3, bins) * mass  # within-bin variance
    c0, c1, c2 = (np.concatenate([[0.0], np.cumsum(t)]) for t in (mass, mass * centers, mass * centers**2 + spread))
    return c0, c1, c2


@pytest.mark.parametrize("kind", ["gaussian", "heavy_tail", "gaps", "even"])
@pytest.mark.parametrize("bins,size", [(40, 2), (40, 7), (256, 16), (256, 64), (512, 32), (512, 256)])
def test_contiguous_clusters_match_reference_dp(kind, bins, size):
    rng = np.random.default_rng(bins * 1000 + size)
    c0, c1, c2 = random_histogram(rng, kind, bins)
    edges = _contiguous_clusters(c0, c1, c2, size)
    expected = reference_clusters(c0, c1, c2, size)
    assert edges[0] == 0 and edges[-1] == bins and np.all(np.diff(edges) > 0) and edges.size == size + 1
    if kind == "even":  # ties: any optimal partition, at the reference's cost
        assert run_sse(c0, c1, c2, edges) == pytest.approx(run_sse(c0, c1, c2, expected), rel=1e-12, abs=1e-15)
    else:
        assert edges.tolist() == expected.tolist()


@pytest.mark.parametrize("bins,size", [(256, 16), (256, 64), (512, 64), (2048, 64)])
def test_contiguous_clusters_work_is_near_bins_times_layers(monkeypatch, bins, size):
    """The DP evaluates about bins * (size - 1) * passes run costs (passes = ceil(log_8 bins), 3
    at the pipeline's 512-bin cap), never the dense bins^2 / 2 per layer."""
    import sopq.quantize as quantize

    evaluated = []
    solve = quantize._monotone_min_plus

    def counting(prev, cost, prev_split):
        return solve(prev, lambda t, j: evaluated.append(t.size) or cost(t, j), prev_split)

    monkeypatch.setattr(quantize, "_monotone_min_plus", counting)
    c0, c1, c2 = random_histogram(np.random.default_rng(bins), "gaussian", bins)
    _contiguous_clusters(c0, c1, c2, size)
    passes = len(quantize._dp_passes(bins + 1))
    assert sum(evaluated) <= 2 * passes * bins * (size - 1) < bins * bins / 2 * (size - 1)


def reference_fp8(v, w, size):
    """Plain O(candidates^2 * size) DP over the E4M3 values, each gap costed item by item."""
    grid = E4M3_VALUES.double().numpy()
    m = grid.size
    gap = np.full((m, m), np.inf)
    for i in range(m):
        for j in range(i + 1, m):
            inside = (v > grid[i]) & (v <= grid[j])
            gap[i, j] = np.sum(w[inside] * np.minimum((v[inside] - grid[i]) ** 2, (v[inside] - grid[j]) ** 2))
    head = np.array([np.sum(w[v <= g] * (v[v <= g] - g) ** 2) for g in grid])
    tail = np.array([np.sum(w[v > g] * (v[v > g] - g) ** 2) for g in grid])
    best, splits = head, []
    for _ in range(1, size):
        splits.append((best[:, None] + gap).argmin(0))
        best = (best[:, None] + gap).min(0)
    chosen = [int(np.argmin(best + tail))]
    for split in reversed(splits):
        chosen.append(int(split[chosen[-1]]))
    return grid[sorted(chosen)]


@pytest.mark.parametrize("size", [4, 16, 32])
def test_fp8_codebook_matches_reference_dp(size):
    g = torch.Generator().manual_seed(size)
    v = torch.randn(300, generator=g, dtype=torch.float64) * 40
    w = torch.rand(300, generator=g, dtype=torch.float64)
    order = v.argsort()
    codebook = _fp8_codebook(v, w, size)
    expected = reference_fp8(v[order].numpy(), w[order].numpy(), size)
    assert codebook.tolist() == expected.tolist()


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


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.floats(0.7, 2.5), min_size=3, max_size=30),
    weights=st.lists(st.floats(0.1, 10.0), min_size=30, max_size=30),
    size=st.integers(2, 4),
)
def test_fp8_codebook_matches_brute_force_over_e4m3(values, weights, size):
    v = torch.tensor(values, dtype=torch.float64)
    w = torch.tensor(weights[: len(values)], dtype=torch.float64)
    codebook = weighted_codebook(v, w, size, mode="fp8")
    assert codebook.shape == (size,) and torch.all(codebook[1:] >= codebook[:-1])
    assert torch.equal(codebook.float().to(torch.float8_e4m3fn).float().double(), codebook)
    # An optimal entry never lies beyond the E4M3 neighbours enclosing the values (moving it
    # there brings it closer to every value), so these candidates suffice for brute force.
    grid = E4M3_VALUES.double()
    lo = grid[grid <= v.min()].max()
    hi = grid[grid >= v.max()].min()
    candidates = grid[(grid >= lo) & (grid <= hi)]
    best = min(
        weighted_sse(v, w, torch.stack(list(combo)))
        for combo in itertools.combinations(candidates, min(size, len(candidates)))
    )
    assert weighted_sse(v, w, codebook) <= best * (1 + 1e-9) + 1e-15


def test_fp8_codebook_at_eight_bits_is_every_e4m3_value():
    codebook = weighted_codebook(torch.randn(100), torch.ones(100), 256, mode="fp8")
    assert codebook.shape == (256,) and set(codebook.tolist()) == set(E4M3_VALUES.tolist())


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown codebook mode 'fp4'"):
        weighted_codebook(torch.randn(10), torch.ones(10), 4, mode="fp4")


@settings(max_examples=100, deadline=None)
@given(
    distinct=st.lists(st.floats(-8, 8, width=32), min_size=1, max_size=40, unique=True),
    repeats=st.lists(st.integers(1, 4), min_size=40, max_size=40),
    values=st.lists(st.floats(-20, 20, width=32), min_size=1, max_size=200),
)
def test_nearest_code_agrees_with_bucketize_except_exact_ties(distinct, repeats, values):
    # Repeated entries (codebooks with fewer distinct values than codes) included.
    codebook = torch.tensor([e for e, r in zip(sorted(distinct), repeats) for _ in range(r)])
    if codebook.numel() < 2:
        codebook = codebook.repeat(2)
    u = torch.tensor(values + codebook.tolist())
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    expected = torch.bucketize(u, midpoints)
    got = NearestCode(codebook)(u)
    differ = got != expected
    # Only values within float rounding of a midpoint (a tie: both entries equally near) may differ.
    to_midpoint = (u[differ, None] - midpoints).abs().min(-1).values if differ.any() else torch.zeros(0)
    assert torch.all(to_midpoint <= 1e-5 * u[differ].abs().clamp(min=1))
    dist_got = (u - codebook[got]).abs()
    dist_expected = (u - codebook[expected]).abs()
    assert torch.allclose(dist_got[differ], dist_expected[differ], rtol=1e-5, atol=1e-6)


def test_alternation_never_raises_the_weighted_error():
    W, H = correlated_layer(seed=2)
    h = torch.diagonal(H)
    errors = []
    for rounds in (1, 2, 4):
        codebook, stored = fit_scales_and_codebook(W, h, 5, 32, "fp16", max_alternations=rounds)
        s = per_weight(decode_scales(stored, "fp16"), 32, W.shape[1])
        W_hat = s * codebook[NearestCode(codebook)(W / s)]
        errors.append((h.float() * (W - W_hat) ** 2).sum().item())
    assert errors[1] <= errors[0] * (1 + 1e-6) and errors[2] <= errors[1] * (1 + 1e-6)


@pytest.mark.parametrize("mode", ["free", "fp8"])
def test_codebook_refit_after_error_feedback_never_raises_output_error(mode):
    W, H = correlated_layer(seed=3)
    q = quantize_layer(W, H, 5, 32, "fp16", mode=mode)
    codebook, stored = fit_scales_and_codebook(W, torch.diagonal(H), 5, 32, "fp16", mode)
    s = decode_scales(stored, "fp16").repeat_interleave(32, dim=1)
    before = layer_errors(W, s * codebook[q.codes.long()], H)["e_out"]
    assert layer_errors(W, q.dequantize(), H)["e_out"] <= before * (1 + 1e-6)
    if mode == "fp8":
        book = q.codebook.float()
        assert torch.equal(book.to(torch.float8_e4m3fn).float(), book)


def test_fp8_mode_layer_decodes_to_e4m3_codebook_values():
    W, H = correlated_layer(seed=4)
    q = quantize_layer(W, H, 6, 32, "e8m0", mode="fp8")
    # E8M0 scales times E4M3 entries: every weight is a power of two times an E4M3 value.
    assert set(q.codebook.float().tolist()) <= set(E4M3_VALUES.tolist())
    assert layer_errors(W, q.dequantize(), H)["e_out"] < 1e-3


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse():
    _, H = correlated_layer(k=40, seed=6)
    H[3, :] = H[:, 3] = 0  # an input never active in calibration
    U = inverse_cholesky(H).double()
    damped = H.clone()
    damped[3, 3] = 1
    damped += 0.01 * torch.diag(damped).mean() * torch.eye(40, dtype=torch.float64)
    assert torch.equal(U, U.triu()) and (torch.diagonal(U) > 0).all()
    inverse = torch.linalg.inv(damped)
    # float32 factorization (as GPTQ's): errors of order cond(H) * 6e-8 relative to the largest entry.
    assert torch.allclose(U.T @ U, inverse, rtol=1e-4, atol=1e-5 * inverse.abs().max().item())


@pytest.mark.parametrize("block", [1, 7, 128])
def test_gptq_round_matches_unblocked_error_feedback(block):
    # A smooth "rounding" (shrink every column) checks the error propagation itself: with a grid,
    # float rounding could flip a tie and hide or fake a difference.
    W, H = correlated_layer(n=8, k=50, seed=7)
    hinv = inverse_cholesky(H)
    got = gptq_round(W, hinv, lambda i, col: 0.9 * col, block=block)
    expected, rest = torch.empty_like(W), W.clone()
    for i in range(W.shape[1]):  # textbook GPTQ: each error goes straight onto every later column
        expected[:, i] = 0.9 * rest[:, i]
        rest[:, i:] -= ((rest[:, i] - expected[:, i]) / hinv[i, i]).unsqueeze(1) * hinv[i, i:]
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_output_error_change_equals_the_difference_of_output_errors():
    W, H = correlated_layer(seed=8)
    g = torch.Generator().manual_seed(8)
    before, after = W + 0.1 * torch.randn(W.shape, generator=g), W + 0.05 * torch.randn(W.shape, generator=g)
    error = lambda X: layer_errors(W, X, H)["e_out"] * torch.trace(W.double() @ H @ W.double().T).item()  # noqa: E731
    assert _output_error_change(W, before, after, H) == pytest.approx(error(after) - error(before), rel=1e-4)


def test_blockwise_search_error_and_lloyd_do_not_depend_on_the_block_size(monkeypatch):
    import sopq.quantize as quantize

    W, H = correlated_layer(seed=9)
    w_g = quantize._grouped(W, 32)
    h_g = quantize._grouped(torch.diagonal(H).float().unsqueeze(0), 32).expand_as(w_g)
    s = w_g.abs().amax(-1)
    codebook = torch.linspace(-1, 1, 32)
    v, w = (W / 3).flatten().double(), torch.rand(W.numel(), dtype=torch.float64)
    results = []
    for chunk in (1 << 30, 7 * 96, 5):  # one block; 7 rows; one row (Lloyd: 5 values) at a time
        monkeypatch.setattr(quantize, "CHUNK_ELEMENTS", chunk)
        results.append((quantize._group_error(w_g, h_g, s, codebook), quantize.lloyd_refine(v, w, codebook.double())))
    for error, centers in results[1:]:
        assert torch.equal(error, results[0][0])
        assert torch.allclose(centers, results[0][1], rtol=1e-12, atol=0)


def test_a_grid_that_reproduces_the_layer_skips_error_feedback(monkeypatch):
    # Weights on a coarse grid with power-of-two row scales, as a GGUF source's are: the fitted
    # codebook and scales reproduce them exactly, so error feedback has nothing to feed back.
    _, H = correlated_layer(n=16, k=64, seed=9)
    g = torch.Generator().manual_seed(9)
    grid = torch.tensor([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0])
    index = torch.randint(0, 7, (16, 64), generator=g)
    index[:, ::32] = 6  # grid value 1: every group's absmax is its row's scale
    W = grid[index] * 2.0 ** torch.randint(-6, -2, (16, 1), generator=g)

    def no_error_feedback(*args, **kwargs):
        raise AssertionError("error feedback ran on a layer its grid reproduces exactly")

    monkeypatch.setattr("sopq.quantize.gptq_round", no_error_feedback)
    q = quantize_layer(W, H, 4, 32, "fp16", error_feedback=True)
    assert torch.equal(q.dequantize(), W)
    assert layer_errors(W, q.dequantize(), H)["e_out"] == 0
    # A layer off the grid still gets error feedback.
    with pytest.raises(AssertionError, match="error feedback ran"):
        quantize_layer(W + 1e-3, H, 4, 32, "fp16", error_feedback=True)


@pytest.mark.parametrize("mode", ["free", "fp8"])
def test_a_fit_without_error_feedback_is_recovered_from_one_with_it(mode):
    W, H = correlated_layer(seed=10)
    with_feedback = quantize_layer(W, H, 5, 32, "bf16", error_feedback=True, mode=mode)
    expected = quantize_layer(W, H, 5, 32, "bf16", error_feedback=False, mode=mode)
    got = without_error_feedback(W, with_feedback)
    for field in ("codebook", "scales", "codes"):
        assert torch.equal(getattr(got, field), getattr(expected, field))
    assert not torch.equal(got.codes, with_feedback.codes)
    with_feedback.fitted_codebook = None
    with pytest.raises(ValueError, match="rerun sensitivity"):
        without_error_feedback(W, with_feedback)
