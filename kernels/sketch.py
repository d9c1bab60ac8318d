"""Count sketch (Charikar et al.; Sketched-SGD): an r x c table with seeded hashes shared by all ranks.

Row j sends coordinate i to column ``h_j(i)`` with sign ``s_j(i)``; both are multiply-add-shift
hashes whose constants come from ``sketch_hashes(rows, seed)``, so every process that uses the
same seed builds the same sketch and sketches can be summed (``sketch_merge``, or a dense
allreduce of the tables). ``sketch_query`` estimates a coordinate as the median over rows of
``s_j(i) * table[j, h_j(i)]``; ``sketch_heavy_hitters`` queries every coordinate and keeps the k
largest estimates.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import njit, prange

from sparsecoll.errors import InvalidArgumentError

from ._dispatch import CUDA, as_device_vector, as_host_vector, backend_of, float_dtype, wrap_like
from ._scalar import median_of_first, sketch_bucket, sketch_sign, splitmix64
from .select import topk_exact

MAX_ROWS = 32  # a query keeps one value per row in a fixed-size local buffer on the GPU
QUERY_CHUNK = 1 << 14


@njit(nogil=True, cache=True)
def _hash_constants(rows, seed):
    out = np.empty((rows, 4), np.uint64)
    state = splitmix64(np.uint64(seed))
    for j in range(rows):
        for h in range(4):
            state = splitmix64(state)
            out[j, h] = state | np.uint64(1)  # odd multipliers keep multiply-shift universal
    return out


def sketch_hashes(rows: int, seed: int) -> np.ndarray:
    """Hash constants (rows x 4 uint64: bucket a, b, sign a, b) that every rank derives alike."""
    if not 1 <= rows <= MAX_ROWS:
        raise InvalidArgumentError(f"rows must be in [1, {MAX_ROWS}], not {rows}")
    return _hash_constants(rows, np.uint64(seed & 0xFFFFFFFFFFFFFFFF))


@njit(nogil=True, cache=True)
def sketch_entry(table, hashes, j, i, value):
    """Adds ``value`` for coordinate ``i`` in row ``j`` (CPU, single writer per table)."""
    col = sketch_bucket(hashes[j, 0], hashes[j, 1], i, table.shape[1])
    table[j, col] += sketch_sign(hashes[j, 2], hashes[j, 3], i) * value


@njit(nogil=True, cache=True)
def estimate(table, hashes, i, buf):
    """Median over rows of the signed counters of coordinate ``i``; ``buf`` holds >= rows floats."""
    rows = table.shape[0]
    for j in range(rows):
        col = sketch_bucket(hashes[j, 0], hashes[j, 1], i, table.shape[1])
        buf[j] = sketch_sign(hashes[j, 2], hashes[j, 3], i) * table[j, col]
    return median_of_first(buf, rows)


@njit(parallel=True, nogil=True, cache=True)
def _insert_dense_cpu(table, hashes, x, parts):
    # each part adds into a private table, so threads never write the same counter
    n = x.size
    private = np.zeros((parts, table.shape[0], table.shape[1]), table.dtype)
    step = (n + parts - 1) // parts
    nonfinite = np.zeros(parts, np.int64)
    for p in prange(parts):
        lo = p * step
        view = x[lo : min(lo + step, n)]
        own = private[p]
        for t in range(view.size):
            value = view[t]
            if not abs(value) < np.inf:
                nonfinite[p] += 1
            for j in range(table.shape[0]):
                sketch_entry(own, hashes, j, lo + t, value)
    table += private.sum(axis=0)
    return nonfinite.sum()


@njit(nogil=True, cache=True)
def _insert_sparse_cpu(table, hashes, idx, val):
    nonfinite = 0
    for t in range(idx.size):
        if not abs(val[t]) < np.inf:
            nonfinite += 1
        for j in range(table.shape[0]):
            sketch_entry(table, hashes, j, idx[t], val[t])
    return nonfinite


@njit(parallel=True, nogil=True, cache=True)
def _query_cpu(table, hashes, idx, out):
    nchunks = (idx.size + QUERY_CHUNK - 1) // QUERY_CHUNK
    for c in prange(nchunks):
        buf = np.empty(table.shape[0], np.float64)
        for t in range(c * QUERY_CHUNK, min((c + 1) * QUERY_CHUNK, idx.size)):
            out[t] = estimate(table, hashes, idx[t], buf)


@njit(parallel=True, nogil=True, cache=True)
def _query_all_cpu(table, hashes, out):
    nchunks = (out.size + QUERY_CHUNK - 1) // QUERY_CHUNK
    for c in prange(nchunks):
        buf = np.empty(table.shape[0], np.float64)
        for t in range(c * QUERY_CHUNK, min((c + 1) * QUERY_CHUNK, out.size)):
            out[t] = estimate(table, hashes, t, buf)


def _check_table(table: Any, hashes: np.ndarray) -> None:
    if table.ndim != 2 or table.shape[0] != hashes.shape[0] or table.shape[1] < 1:
        raise InvalidArgumentError(
            f"sketch table of shape {tuple(table.shape)} does not match {hashes.shape[0]} hash rows"
        )
    if np.dtype(table.dtype) not in (np.float32, np.float64):
        raise InvalidArgumentError(f"sketch table must be float32 or float64, not {table.dtype}")


def _widen(values: np.ndarray) -> np.ndarray:
    float_dtype(values.dtype, "values")
    return values.astype(np.float32) if values.dtype.itemsize == 2 else values


def sketch_insert_dense(table: Any, hashes: np.ndarray, array: Any) -> Any:
    """Adds a dense vector (coordinate i = position i) into ``table`` in place; returns table."""
    _check_table(table, hashes)
    if backend_of(table, array) == CUDA:
        from . import _sketch_cuda

        _sketch_cuda.insert_dense(table, hashes, as_device_vector(array))
        return table
    x = _widen(as_host_vector(array))
    parts = max(1, min(numba.get_num_threads(), x.size // (1 << 16)))
    bad = _insert_dense_cpu(table, hashes, x, parts)
    if bad:
        raise InvalidArgumentError(f"vector holds {int(bad)} NaN or inf value(s)")
    return table


def sketch_insert_sparse(table: Any, hashes: np.ndarray, indices: Any, values: Any) -> Any:
    """Adds a sparse vector (signed values at int indices) into ``table`` in place; returns table."""
    _check_table(table, hashes)
    if backend_of(table, indices, values) == CUDA:
        from . import _sketch_cuda

        _sketch_cuda.insert_sparse(table, hashes, as_device_vector(indices), as_device_vector(values))
        return table
    idx = as_host_vector(indices).astype(np.int64, copy=False)
    val = _widen(as_host_vector(values))
    if idx.size != val.size:
        raise InvalidArgumentError(f"{idx.size} indices but {val.size} values")
    if idx.size and int(idx.min()) < 0:
        raise InvalidArgumentError("indices must be >= 0")
    bad = _insert_sparse_cpu(table, hashes, idx, val)
    if bad:
        raise InvalidArgumentError(f"values hold {int(bad)} NaN or inf value(s)")
    return table


def sketch_merge(into: Any, other: Any) -> Any:
    """Sums ``other`` into ``into`` in place (count sketches are linear); returns into."""
    if tuple(into.shape) != tuple(other.shape):
        raise InvalidArgumentError(f"sketch shapes differ: {tuple(into.shape)} vs {tuple(other.shape)}")
    if backend_of(into, other) == CUDA:
        from . import _sketch_cuda

        _sketch_cuda.add_into(into, other)
        return into
    np.add(into, other, out=into)
    return into


def sketch_query(table: Any, hashes: np.ndarray, indices: Any) -> Any:
    """Estimates of the coordinates ``indices`` (float64 on CPU, the table's dtype on GPU)."""
    _check_table(table, hashes)
    if backend_of(table, indices) == CUDA:
        from . import _sketch_cuda

        return wrap_like(table, _sketch_cuda.query(table, hashes, as_device_vector(indices)))
    idx = as_host_vector(indices).astype(np.int64, copy=False)
    out = np.empty(idx.size, np.float64)
    _query_cpu(table, hashes, idx, out)
    return out


def sketch_heavy_hitters(table: Any, hashes: np.ndarray, size: int, k: int) -> tuple[Any, Any]:
    """The k coordinates of ``[0, size)`` with the largest ``|estimate|``, as (sorted indices, estimates)."""
    _check_table(table, hashes)
    if size < 0:
        raise InvalidArgumentError(f"size must be >= 0, not {size}")
    if backend_of(table) == CUDA:
        from . import _sketch_cuda

        estimates = _sketch_cuda.query_all(table, hashes, size)
        idx, values = topk_exact(estimates, k)
        return wrap_like(table, idx), wrap_like(table, values)
    estimates = np.empty(size, np.float64)
    _query_all_cpu(table, hashes, estimates)
    return topk_exact(estimates, k)
