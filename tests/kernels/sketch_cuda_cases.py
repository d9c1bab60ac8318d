"""The CUDA sketch recovery against the CPU one, bit for bit (run by ``test_cuda.py``).

Not collected by a plain ``pytest``: it needs ``NUMBA_ENABLE_CUDASIM=1`` (or a GPU) set before
numba is imported. The simulator runs every thread in Python, so sizes stay in the thousands;
``MIN_SAMPLE`` is lowered so that the strided sample, the threshold retries and the zero fill
all run at those sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

import sparsecoll.kernels as K
from sparsecoll.kernels import sketch

if not cuda.is_available():
    pytest.skip("neither a CUDA device nor the simulator is available", allow_module_level=True)


@pytest.fixture(autouse=True)
def small_sample(monkeypatch):
    monkeypatch.setattr(sketch, "MIN_SAMPLE", 32)


def table_of(x: np.ndarray, rows: int, columns: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    hashes = K.sketch_hashes(rows, seed)
    return K.sketch_insert_dense(np.zeros((rows, columns), np.float32), hashes, x), hashes


@pytest.mark.parametrize("rows, columns, k", [(5, 64, 20), (4, 50, 40), (1, 300, 10)])
def test_heavy_hitters_match_cpu_and_reference(rows, columns, k):
    x = np.random.default_rng(rows).standard_t(2, 1000).astype(np.float32)
    table, hashes = table_of(x, rows, columns, 9)
    idx, est = K.sketch_heavy_hitters(cuda.to_device(table), hashes, x.size, k)
    cpu_idx, cpu_est = K.sketch_heavy_hitters(table, hashes, x.size, k)
    every = K.sketch_query(table, hashes, np.arange(x.size))
    reference_idx, reference_est = K.topk_exact(every, k)
    np.testing.assert_array_equal(cpu_idx, reference_idx)
    np.testing.assert_array_equal(cpu_est, reference_est)
    np.testing.assert_array_equal(idx.copy_to_host(), cpu_idx)
    np.testing.assert_array_equal(est.copy_to_host(), cpu_est.astype(np.float32))


def test_fewer_nonzero_estimates_than_k_fill_with_the_lowest_zero_coordinates():
    x = np.zeros(1000, np.float32)
    x[[7, 500, 999]] = [1.0, -2.0, 3.0]
    table, hashes = table_of(x, 5, 100, 4)
    idx, est = K.sketch_heavy_hitters(cuda.to_device(table), hashes, x.size, 12)
    every = K.sketch_query(table, hashes, np.arange(x.size))
    reference_idx, reference_est = K.topk_exact(every, 12)
    np.testing.assert_array_equal(idx.copy_to_host(), reference_idx)
    np.testing.assert_array_equal(est.copy_to_host(), reference_est.astype(np.float32))
    assert {7, 500, 999} <= set(idx.copy_to_host().tolist())


def test_a_candidate_pass_that_overflows_its_slots_is_redone():
    from sparsecoll.kernels import _sketch_cuda

    x = np.random.default_rng(3).standard_t(2, 1000).astype(np.float32)
    table, hashes = table_of(x, 5, 64, 2)
    _sample, candidates, _query = _sketch_cuda.recovery_steps(cuda.to_device(table), hashes, x.size)
    idx, est = candidates(sketch.SMALLEST_POSITIVE, 0)  # room for 64 of ~1000 survivors
    every = K.sketch_query(table, hashes, np.arange(x.size))
    np.testing.assert_array_equal(idx, np.flatnonzero(every))
    assert est.tobytes() == every[idx].tobytes()
