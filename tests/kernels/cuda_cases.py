"""The CUDA kernels against the CPU kernels, case by case.

Not collected by a plain ``pytest`` (the name does not start with ``test_``): ``test_cuda.py``
runs this file in a subprocess, under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` must be
set before numba is imported) and, where a GPU is present, on the device. The simulator runs
every thread in Python, so sizes stay in the thousands.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

import sparsecoll.kernels as K
from sparsecoll.errors import InvalidArgumentError
from sparsecoll.kernels import select

if not cuda.is_available():
    pytest.skip("neither a CUDA device nor the simulator is available", allow_module_level=True)

SIZES = [0, 1, 37, 1000]
DTYPES = [np.float16, np.float32, np.float64]


def host(array) -> np.ndarray:
    return array.copy_to_host()


def vector(size: int, dtype, seed: int = 0, ties: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(-4, 5, size).astype(np.float64) if ties else rng.standard_normal(size)
    return x.astype(dtype)


@pytest.fixture
def small_fast_path(monkeypatch):
    """Lets the sampled fast path run on simulator-sized vectors."""
    monkeypatch.setattr(select, "FAST_MIN_SIZE", 256)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_topk_matches_cpu(size, dtype, ties, small_fast_path):
    x = vector(size, dtype, ties=ties)
    k = size // 10
    expected_idx, expected_val = K.topk_exact(x, k)
    for method in ("exact", "fast"):
        idx, val = K.topk(cuda.to_device(x), k, method=method)
        np.testing.assert_array_equal(host(idx), expected_idx)
        np.testing.assert_array_equal(host(val), expected_val)


def test_topk_on_several_blocks(small_fast_path):
    x = vector(3000, np.float32, seed=8)
    expected_idx, _ = K.topk_exact(x, 300)
    for method in ("exact", "fast"):
        np.testing.assert_array_equal(host(K.topk(cuda.to_device(x), 300, method=method)[0]), expected_idx)


def test_approximate_topk_returns_values_at_indices(small_fast_path):
    x = vector(2500, np.float32, seed=3)
    idx, val = K.topk_fast(cuda.to_device(x), 100, approximate=True)
    np.testing.assert_array_equal(host(val), x[host(idx)])
    assert 50 <= host(idx).size <= 200


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_threshold_matches_cpu(size, dtype):
    x = vector(size, dtype, seed=1)
    idx, val = K.select_threshold(cuda.to_device(x), 1.25)
    expected_idx, expected_val = K.select_threshold(x, 1.25)
    np.testing.assert_array_equal(host(idx), expected_idx)
    np.testing.assert_array_equal(host(val), expected_val)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_input_raises(bad, small_fast_path):
    x = vector(600, np.float32)
    x[300] = bad
    device = cuda.to_device(x)
    for call in (
        lambda: K.topk_exact(device, 3),
        lambda: K.topk_fast(device, 3),
        lambda: K.select_threshold(device, 0.5),
        lambda: K.quantize(device, 4),
        lambda: K.random_sparsify(device, 0.1),
    ):
        with pytest.raises(InvalidArgumentError, match="NaN or inf"):
            call()


@pytest.mark.parametrize("size", [0, 5, 1000])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantize_matches_cpu_bit_for_bit(size, bits):
    x = vector(size, np.float32, seed=2)
    packed, scales = K.quantize(cuda.to_device(x), bits, block_size=64, seed=9)
    expected_packed, expected_scales = K.quantize(x, bits, block_size=64, seed=9)
    np.testing.assert_array_equal(host(packed), expected_packed)
    np.testing.assert_array_equal(host(scales), expected_scales)
    values = K.dequantize(packed, scales, bits, size, block_size=64)
    expected = K.dequantize(expected_packed, expected_scales, bits, size, block_size=64)
    np.testing.assert_allclose(host(values), expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_random_sparsify_matches_cpu(dtype):
    x = vector(2000, dtype, seed=4)
    idx, val = K.random_sparsify(cuda.to_device(x), 0.05, seed=7)
    expected_idx, expected_val = K.random_sparsify(x, 0.05, seed=7)
    np.testing.assert_array_equal(host(idx), expected_idx)
    np.testing.assert_allclose(host(val), expected_val, rtol=1e-6)


def test_sketch_matches_cpu():
    x = vector(1500, np.float32, seed=5) * 0.01
    x[[10, 700, 1400]] = [50.0, -60.0, 70.0]
    hashes = K.sketch_hashes(5, 21)
    expected = K.sketch_insert_dense(np.zeros((5, 256), np.float32), hashes, x)
    table = cuda.to_device(np.zeros((5, 256), np.float32))
    K.sketch_insert_dense(table, hashes, cuda.to_device(x))
    np.testing.assert_allclose(host(table), expected, atol=1e-4)
    other = cuda.to_device(np.zeros((5, 256), np.float32))
    K.sketch_insert_sparse(other, hashes, cuda.to_device(np.array([3, 10])), cuda.to_device(np.array([1.0, 2.0], np.float32)))
    K.sketch_merge(table, other)
    K.sketch_insert_sparse(expected, hashes, np.array([3, 10]), np.array([1.0, 2.0], np.float32))
    np.testing.assert_allclose(host(table), expected, atol=1e-4)
    query = np.array([10, 700, 1400, 3])
    np.testing.assert_allclose(host(K.sketch_query(table, hashes, cuda.to_device(query))), K.sketch_query(expected, hashes, query), atol=1e-4)
    idx, est = K.sketch_heavy_hitters(table, hashes, x.size, 3)
    expected_idx, expected_est = K.sketch_heavy_hitters(expected, hashes, x.size, 3)
    np.testing.assert_array_equal(host(idx), [10, 700, 1400])
    np.testing.assert_array_equal(expected_idx, [10, 700, 1400])
    np.testing.assert_allclose(host(est), expected_est, atol=1e-3)


@pytest.mark.parametrize("sizes", [(0, 0), (0, 5), (7, 0), (40, 60)])
def test_sparse_helpers_match_cpu(sizes):
    rng = np.random.default_rng(sum(sizes))
    ia = np.sort(rng.choice(100, sizes[0], replace=False)).astype(np.int64)
    ib = np.sort(rng.choice(100, sizes[1], replace=False)).astype(np.int64)
    va, vb = rng.standard_normal(ia.size), rng.standard_normal(ib.size)
    idx, val = K.merge_sorted(*(cuda.to_device(a) for a in (ia, va, ib, vb)))
    expected_idx, expected_val = K.merge_sorted(ia, va, ib, vb)
    np.testing.assert_array_equal(host(idx), expected_idx)
    np.testing.assert_allclose(host(val), expected_val)
    k = expected_idx.size // 2
    top_idx, top_val = K.topk_sparse(idx, val, k)
    expected_top = K.topk_sparse(expected_idx, expected_val, k)
    np.testing.assert_array_equal(host(top_idx), expected_top[0])
    np.testing.assert_array_equal(host(top_val), expected_top[1])
    dense = cuda.to_device(np.zeros(100))
    K.scatter_add(dense, cuda.to_device(np.concatenate([ia, ia])), cuda.to_device(np.concatenate([va, va])))
    expected_dense = K.scatter_add(np.zeros(100), np.concatenate([ia, ia]), np.concatenate([va, va]))
    np.testing.assert_allclose(host(dense), expected_dense)
    np.testing.assert_array_equal(host(K.gather(dense, cuda.to_device(ib))), expected_dense[ib])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_random_sparsify_variance_budget_matches_cpu(dtype):
    x = np.random.default_rng(3).standard_t(2, 1200).astype(dtype)
    idx, val = K.random_sparsify(cuda.to_device(x), seed=7, variance_budget=0.5)
    expected_idx, expected_val = K.random_sparsify(x, seed=7, variance_budget=0.5)
    np.testing.assert_array_equal(host(idx), expected_idx)
    np.testing.assert_allclose(host(val), expected_val, rtol=1e-6)
