"""Heavy-hitter recovery in one filtered pass: the same coordinates and estimates, bit for bit,
as the top k of every coordinate's estimate; and the blocked insert against the per-element one."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecoll.errors import InvalidArgumentError
from sparsecoll.kernels import (
    sketch_hashes,
    sketch_heavy_hitters,
    sketch_insert_dense,
    sketch_insert_sparse,
    sketch_query,
    topk_exact,
)
from sparsecoll.kernels import sketch
from sparsecoll.kernels.sketch import SMALLEST_POSITIVE, _candidates_host, _recover


def every_estimate(table: np.ndarray, hashes: np.ndarray, size: int) -> np.ndarray:
    return sketch_query(table, hashes, np.arange(size))


@pytest.mark.parametrize("size, rows, columns, k", [
    (300_001, 5, 2000, 400),   # strided sample, 19 candidate chunks
    (200_000, 4, 5000, 1000),  # even rows: the median averages the middle two
    (150_000, 1, 700, 3000),   # one row; more coordinates wanted than the sketch has columns
    (1000, 3, 10, 60),         # a sketch sized below k
    (5000, 5, 97, 0),
])
def test_recovery_is_the_exact_top_k_of_every_estimate(size, rows, columns, k):
    x = np.random.default_rng(size).standard_t(2, size).astype(np.float32)
    hashes = sketch_hashes(rows, 3)
    table = sketch_insert_dense(np.zeros((rows, columns), np.float32), hashes, x)
    idx, est = sketch_heavy_hitters(table, hashes, size, k)
    expected_idx, expected_est = topk_exact(every_estimate(table, hashes, size), k)
    np.testing.assert_array_equal(idx, expected_idx)
    assert est.dtype == np.float64 and est.tobytes() == expected_est.tobytes()


@pytest.mark.parametrize("nonzero", [0, 3])
def test_fewer_nonzero_estimates_than_k_take_the_lowest_zero_coordinates(nonzero):
    """As topk_exact breaks ties: an all-zero or nearly empty sketch still gives k coordinates."""
    x = np.zeros(100_000, np.float32)
    x[[5, 99, 5000][:nonzero]] = [1.0, -2.0, 3.0][:nonzero]
    hashes = sketch_hashes(5, 1)
    table = sketch_insert_dense(np.zeros((5, 1000), np.float32), hashes, x)
    idx, est = sketch_heavy_hitters(table, hashes, x.size, 50)
    expected_idx, expected_est = topk_exact(every_estimate(table, hashes, x.size), 50)
    np.testing.assert_array_equal(idx, expected_idx)
    assert est.tobytes() == expected_est.tobytes()


def recover_from(estimates: np.ndarray, k: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """``_recover`` over known estimates: the backends are plain numpy, the stride is forced."""

    def sample(_stride: int, count: int) -> np.ndarray:
        return np.abs(estimates[::stride])[:count]

    def candidates(threshold: float, _expected: int) -> tuple[np.ndarray, np.ndarray]:
        kept = np.flatnonzero(np.abs(estimates) >= threshold)
        return kept, estimates[kept]

    original = sketch._recovery_sample
    sketch._recovery_sample = lambda n, wanted: (stride, -(-n // stride))
    try:
        return _recover(estimates.size, k, sample, candidates, lambda i: estimates[i])
    finally:
        sketch._recovery_sample = original


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 400), st.data())
def test_the_recovery_driver_finds_the_top_k_whatever_the_sample_says(size, data):
    """``_recover``'s threshold, retries and zero fill against topk_exact, on estimates with ties,
    zeros and values the strided sample misses."""
    values = data.draw(st.lists(st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, -7.0, 1e-300, 40.0]),
                                min_size=size, max_size=size))
    estimates = np.array(values, np.float64)
    k = data.draw(st.integers(0, size))
    idx, est = recover_from(estimates, k, data.draw(st.integers(1, 16)))
    expected_idx, expected_est = topk_exact(estimates, k)
    np.testing.assert_array_equal(idx, expected_idx)
    assert est.tobytes() == expected_est.tobytes()


def test_a_sample_that_sees_only_the_heaviest_lowers_its_threshold():
    """Every 16th coordinate is heavy and the sample sees only those: the first threshold keeps
    25 candidates for k = 100, so the driver must pass again lower (the rest rise with the index,
    so a fill from the lowest indices would be wrong)."""
    estimates = 1.0 + np.arange(400) / 1000.0
    estimates[::16] = 40.0
    idx, est = recover_from(estimates, 100, 16)
    expected_idx, expected_est = topk_exact(estimates, 100)
    np.testing.assert_array_equal(idx, expected_idx)
    assert est.tobytes() == expected_est.tobytes()


def test_the_candidate_pass_keeps_every_estimate_at_or_above_the_threshold():
    """Small integer values make estimates (and counters) equal the threshold exactly: those
    coordinates are candidates too, so a counter equal to the threshold must count as hot."""
    size = 200_000
    x = np.random.default_rng(6).integers(-2, 3, size).astype(np.float32)
    hashes = sketch_hashes(5, 6)
    table = sketch_insert_dense(np.zeros((5, 40_000), np.float32), hashes, x)
    every = every_estimate(table, hashes, size)
    for threshold in np.unique(np.abs(every))[-6:-1]:
        idx, est = _candidates_host(table, hashes, size, float(threshold), 1000)
        np.testing.assert_array_equal(idx, np.flatnonzero(np.abs(every) >= threshold))
        assert est.tobytes() == every[idx].tobytes()


def test_a_candidate_chunk_that_overflows_its_slots_is_redone():
    x = np.random.default_rng(2).standard_t(2, 40_000).astype(np.float32)
    hashes = sketch_hashes(5, 2)
    table = sketch_insert_dense(np.zeros((5, 4000), np.float32), hashes, x)
    idx, est = _candidates_host(table, hashes, x.size, SMALLEST_POSITIVE, 0)  # room for 64 a chunk
    every = every_estimate(table, hashes, x.size)
    np.testing.assert_array_equal(idx, np.flatnonzero(every))
    assert est.tobytes() == every[idx].tobytes()


def test_blocked_insert_matches_the_per_element_insert_bit_for_bit():
    x = np.random.default_rng(3).standard_t(2, 3 * 4096 + 17).astype(np.float32)
    hashes = sketch_hashes(5, 8)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)  # one part: each counter takes its values in index order, as below
    try:
        dense = sketch_insert_dense(np.zeros((5, 333), np.float32), hashes, x)
    finally:
        numba.set_num_threads(threads)
    one_by_one = sketch_insert_sparse(np.zeros((5, 333), np.float32), hashes, np.arange(x.size), x)
    assert dense.tobytes() == one_by_one.tobytes()


def test_k_outside_the_vector_is_refused():
    hashes = sketch_hashes(3, 1)
    with pytest.raises(InvalidArgumentError, match="k=11"):
        sketch_heavy_hitters(np.zeros((3, 10), np.float32), hashes, 10, 11)
    with pytest.raises(InvalidArgumentError):
        sketch_heavy_hitters(np.zeros((3, 10), np.float32), hashes, 10, -1)
