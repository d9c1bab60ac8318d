"""Scatter-add, gather, sorted merge and sparse top-k on the CPU kernels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecoll.errors import InvalidArgumentError
from sparsecoll.kernels import gather, merge_sorted, scatter_add, topk_sparse


@st.composite
def sparse_vectors(draw, universe: int = 200):
    idx = np.array(sorted(draw(st.sets(st.integers(0, universe - 1), max_size=60))), np.int64)
    seed = draw(st.integers(0, 1000))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    val = np.random.default_rng(seed).standard_normal(idx.size).astype(dtype)
    return idx, val


@settings(max_examples=100, deadline=None)
@given(a=sparse_vectors(), b=sparse_vectors())
def test_merge_sorted_equals_dense_sum(a, b):
    idx, val = merge_sorted(*a, *b)
    dense = np.zeros(200)
    np.add.at(dense, a[0], a[1].astype(np.float64))
    np.add.at(dense, b[0], b[1].astype(np.float64))
    np.testing.assert_array_equal(idx, np.union1d(a[0], b[0]))
    assert val.dtype == np.result_type(a[1].dtype, b[1].dtype)
    tolerance = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}[val.dtype]
    np.testing.assert_allclose(val.astype(np.float64), dense[idx], rtol=tolerance, atol=tolerance)


@settings(max_examples=60, deadline=None)
@given(a=sparse_vectors(), k=st.integers(0, 60))
def test_topk_sparse_keeps_largest_values_in_index_order(a, k):
    idx, val = a
    k = min(k, idx.size)
    top_idx, top_val = topk_sparse(idx, val, k)
    order = np.lexsort((np.arange(idx.size), -np.abs(val.astype(np.float64))))
    chosen = np.sort(order[:k])
    np.testing.assert_array_equal(top_idx, idx[chosen])
    np.testing.assert_array_equal(top_val, val[chosen])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_scatter_add_accumulates_duplicates_and_gather_reads_back(dtype):
    dense = np.zeros(10, dtype)
    scatter_add(dense, np.array([1, 1, 4, 9]), np.array([1.0, 2.0, -3.0, 0.5]))
    np.testing.assert_array_equal(dense, np.array([0, 3, 0, 0, -3, 0, 0, 0, 0, 0.5], dtype))
    np.testing.assert_array_equal(gather(dense, np.array([4, 1, 1])), np.array([-3, 3, 3], dtype))


def test_bad_sparse_arguments_raise():
    with pytest.raises(InvalidArgumentError):
        scatter_add(np.zeros(4), np.array([4]), np.array([1.0]))
    with pytest.raises(InvalidArgumentError):
        gather(np.zeros(4), np.array([-1]))
    with pytest.raises(InvalidArgumentError):
        merge_sorted(np.array([2, 1]), np.ones(2), np.array([0]), np.ones(1))
    with pytest.raises(InvalidArgumentError):
        merge_sorted(np.array([1, 2]), np.ones(3), np.array([0]), np.ones(1))
    with pytest.raises(InvalidArgumentError):
        topk_sparse(np.array([1, 2]), np.array([1.0, np.nan]), 1)
