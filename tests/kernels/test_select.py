"""Top-k and threshold selection on the CPU kernels against a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecoll.errors import InvalidArgumentError
from sparsecoll.kernels import estimate_threshold, select_threshold, topk, topk_exact, topk_fast

DTYPES = [np.float16, np.float32, np.float64]


def reference_topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest |x|, ties to the lower index, sorted ascending."""
    order = np.lexsort((np.arange(x.size), -np.abs(x.astype(np.float64))))
    return np.sort(order[:k])


def assert_topk(x: np.ndarray, k: int, idx: np.ndarray, val: np.ndarray) -> None:
    expected = reference_topk(x, k)
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(idx, expected)
    assert val.dtype == x.dtype
    np.testing.assert_array_equal(val, x[expected])


@st.composite
def vectors(draw, max_size: int = 5000):
    size = draw(st.sampled_from([0, 1, 2, 7, 100, 1023, 4097]) | st.integers(0, max_size))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["normal", "ties", "heavy", "zeros"]))
    if kind == "normal":
        x = rng.standard_normal(size)
    elif kind == "ties":
        x = rng.integers(-3, 4, size).astype(np.float64)
    elif kind == "heavy":
        x = rng.standard_cauchy(size)
        x = np.clip(x, -1e4, 1e4)
    else:
        x = np.zeros(size)
    return x.astype(dtype)


@settings(max_examples=150, deadline=None)
@given(x=vectors(), fraction=st.floats(0, 1), method=st.sampled_from(["exact", "fast"]))
def test_topk_matches_reference(x, fraction, method):
    k = int(round(fraction * x.size))
    idx, val = topk(x, k, method=method)
    assert_topk(x, k, idx, val)


@settings(max_examples=25, deadline=None)
@given(
    size=st.integers(1 << 16, 1 << 19),
    density=st.sampled_from([0.001, 0.01, 0.1]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 1000),
)
def test_fast_path_equals_exact_on_large_vectors(size, density, dtype, seed):
    x = np.random.default_rng(seed).standard_normal(size).astype(dtype)
    k = max(1, int(size * density))
    idx, val = topk_fast(x, k, seed=seed)
    assert_topk(x, k, idx, val)


def test_fast_path_on_clustered_magnitudes_falls_back_correctly():
    # large values packed into one region defeat a uniform sample's estimate; the result must hold
    x = np.random.default_rng(1).standard_normal(1 << 18).astype(np.float32) * 1e-3
    x[5000:5400] = np.linspace(1, 2, 400)
    assert_topk(x, 300, *topk_fast(x, 300))


@pytest.mark.slow
def test_topk_on_vector_of_2_pow_24_plus_elements():
    size = (1 << 24) + 3
    x = np.random.default_rng(0).standard_normal(size, dtype=np.float32)
    k = size // 1000
    exact = topk_exact(x, k)
    fast = topk_fast(x, k)
    ref = np.argpartition(np.abs(x), size - k)[size - k :]
    np.testing.assert_array_equal(exact[0], np.sort(ref))  # no ties in continuous data
    np.testing.assert_array_equal(fast[0], exact[0])
    np.testing.assert_array_equal(fast[1], x[exact[0]])
    idx, _ = select_threshold(x, 3.0)
    np.testing.assert_array_equal(idx, np.flatnonzero(np.abs(x) > 3.0))


@settings(max_examples=40, deadline=None)
@given(x=vectors(), seed=st.integers(0, 100))
def test_approximate_topk_returns_everything_above_its_threshold(x, seed):
    k = max(0, x.size // 50)
    idx, val = topk_fast(x, k, approximate=True, seed=seed)
    np.testing.assert_array_equal(val, x[idx])
    if idx.size and idx.size < x.size:
        cut = np.abs(val.astype(np.float64)).min()
        outside = np.delete(np.abs(x.astype(np.float64)), idx)
        assert outside.max(initial=0) <= cut  # equal magnitudes may fall on either side
    assert np.all(np.diff(idx) > 0)


def test_approximate_count_is_close_to_k():
    x = np.random.default_rng(3).standard_normal(1 << 20).astype(np.float32)
    k = 1000
    idx, _ = topk_fast(x, k, approximate=True)
    assert 0.7 * k <= idx.size <= 1.3 * k


@settings(max_examples=100, deadline=None)
@given(x=vectors(), threshold=st.floats(-1, 5, allow_nan=False))
def test_select_threshold_matches_numpy(x, threshold):
    idx, val = select_threshold(x, threshold)
    expected = np.flatnonzero(np.abs(x.astype(np.float64)) > threshold)
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_array_equal(val, x[expected])


def test_threshold_between_float16_values_is_exact():
    x = np.array([1.0, 1.0009765625, -1.5], np.float16)  # 1 + 2^-10 is float16's next after 1
    idx, _ = select_threshold(x, 1.0001)
    np.testing.assert_array_equal(idx, [1, 2])
    idx, _ = select_threshold(x, 1.0)
    np.testing.assert_array_equal(idx, [1, 2])


def test_estimate_threshold_keeps_about_k():
    x = np.random.default_rng(5).standard_normal(1 << 20)
    t = estimate_threshold(x, 1000)
    assert 700 <= np.count_nonzero(np.abs(x) > t) <= 1300


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("size", [5, 1 << 17])
def test_nonfinite_input_raises(dtype, bad, size):
    x = np.ones(size, dtype)
    x[size // 2] = bad
    for call in (
        lambda: topk_exact(x, 2),
        lambda: topk_fast(x, 2),
        lambda: topk_fast(x, 2, approximate=True),
        lambda: select_threshold(x, 0.5),
    ):
        with pytest.raises(InvalidArgumentError, match="NaN or inf"):
            call()
    with pytest.raises(ValueError):
        topk_exact(x, 0)


def test_fast_path_counts_every_nonfinite_value():
    # the selection pass skips runs whose maximum is below the threshold: NaN/inf among small
    # values must still be seen and counted exactly
    x = np.random.default_rng(9).standard_normal(1 << 20).astype(np.float32)
    x[np.argsort(np.abs(x))[:7]] = [np.nan, np.inf, -np.inf, np.nan, np.inf, np.nan, -np.nan]
    with pytest.raises(InvalidArgumentError, match="holds 7 NaN or inf"):
        topk_fast(x, 1000)


@pytest.mark.parametrize("k", [-1, 6, 2.5, True])
def test_bad_k_raises(k):
    with pytest.raises(InvalidArgumentError):
        topk(np.ones(5, np.float32), k)


def test_bad_dtype_and_method_raise():
    with pytest.raises(InvalidArgumentError):
        topk(np.ones(5, np.int32), 1)
    with pytest.raises(InvalidArgumentError):
        topk(np.ones(5, np.float32), 1, method="radix")
    with pytest.raises(InvalidArgumentError):
        select_threshold(np.ones(5, np.float32), float("nan"))


def test_multidimensional_input_is_flattened():
    x = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5
    idx, val = topk(x, 3)
    assert_topk(x.reshape(-1), 3, idx, val)
