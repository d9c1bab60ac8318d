"""Count sketch: linearity, shared hashes, query accuracy and heavy-hitter recovery."""

from __future__ import annotations

import numpy as np
import pytest

from sparsecoll.errors import InvalidArgumentError
from sparsecoll.kernels import (
    sketch_hashes,
    sketch_heavy_hitters,
    sketch_insert_dense,
    sketch_insert_sparse,
    sketch_merge,
    sketch_query,
)


def heavy_vector(size: int, hot: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(size) * 0.01
    hot_idx = np.sort(rng.choice(size, hot, replace=False))
    x[hot_idx] = rng.choice([-1.0, 1.0], hot) * (10 + rng.random(hot))
    return x.astype(np.float32), hot_idx


def test_hashes_are_deterministic_per_seed():
    np.testing.assert_array_equal(sketch_hashes(5, 7), sketch_hashes(5, 7))
    assert not np.array_equal(sketch_hashes(5, 7), sketch_hashes(5, 8))


@pytest.mark.parametrize("size", [0, 1, 1000, 300_001])
def test_dense_and_sparse_inserts_agree_and_sketches_are_linear(size):
    x, _ = heavy_vector(size, min(size, 5), 0)
    hashes = sketch_hashes(5, 3)
    dense = sketch_insert_dense(np.zeros((5, 97), np.float64), hashes, x)
    sparse = sketch_insert_sparse(np.zeros((5, 97), np.float64), hashes, np.arange(size), x)
    np.testing.assert_allclose(dense, sparse, atol=1e-9)
    half = size // 2
    a = sketch_insert_dense(np.zeros((5, 97)), hashes, np.concatenate([x[:half], np.zeros(size - half, x.dtype)]))
    b = sketch_insert_sparse(np.zeros((5, 97)), hashes, np.arange(half, size), x[half:])
    np.testing.assert_allclose(sketch_merge(a, b), dense, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_heavy_hitters_are_recovered(dtype):
    x, hot = heavy_vector(200_000, 30, 1)
    x = x.astype(dtype)
    hashes = sketch_hashes(5, 11)
    table = sketch_insert_dense(np.zeros((5, 20_000), np.float32), hashes, x)
    idx, est = sketch_heavy_hitters(table, hashes, x.size, 30)
    np.testing.assert_array_equal(idx, hot)
    np.testing.assert_allclose(est, x[hot].astype(np.float64), atol=0.5)
    np.testing.assert_allclose(sketch_query(table, hashes, hot), est)


def test_bad_sketch_arguments_raise():
    with pytest.raises(InvalidArgumentError):
        sketch_hashes(0, 1)
    hashes = sketch_hashes(3, 1)
    with pytest.raises(InvalidArgumentError):
        sketch_insert_dense(np.zeros((4, 10)), hashes, np.ones(5))
    with pytest.raises(InvalidArgumentError):
        sketch_insert_dense(np.zeros((3, 10)), hashes, np.array([1.0, np.inf]))
    with pytest.raises(InvalidArgumentError):
        sketch_merge(np.zeros((3, 10)), np.zeros((3, 11)))
