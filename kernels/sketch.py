"""Count sketch (Charikar et al.; Sketched-SGD): an r x c table with seeded hashes shared by all ranks.

Row j sends coordinate i to column ``h_j(i)`` with sign ``s_j(i)``. Coordinates go in blocks of
64 consecutive ones (``_scalar.sketch_bucket``): a multiply-add-shift hash of the block picks its
start column and sign in each row, and the block fills consecutive columns from there. Any two
coordinates of different blocks still collide with probability 1/c and have independent signs,
which is all the count sketch's error bound uses; an insert becomes one contiguous run of adds
per block and row, and recovery tests 64 coordinates with a few word operations. The constants
come from ``sketch_hashes(rows, seed)``, so every process that uses the same seed builds the
same sketch and sketches can be summed (``sketch_merge``, or a dense allreduce of the tables).
``sketch_query`` estimates a coordinate as the median over rows of ``s_j(i) * table[j, h_j(i)]``;
``sketch_heavy_hitters`` finds the k largest estimates in one filtered pass over the
coordinates (a sampled threshold and a cache-resident map of the counters above it,
:mod:`._sketch_candidates`), never holding all d estimates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from numba import njit, prange

from sparsecoll.errors import InvalidArgumentError

from ._dispatch import CUDA, as_device_vector, as_host_vector, backend_of, float_dtype, to_device, wrap_like
from ._scalar import sketch_block_shift, sketch_bucket, sketch_sign, splitmix64
from ._sketch_scalar import block_is_negative, block_start, row_estimate
from ._sketch_candidates import candidates_host
from .select import topk_exact

MAX_ROWS = 32  # a query keeps one value per row in a fixed-size local buffer on the GPU
QUERY_CHUNK = 1 << 14
SAMPLE_HITS = 256  # sampled coordinates expected above the recovery threshold
MIN_SAMPLE = 1 << 16  # coordinates sampled at least (all of them when the vector is smaller)
MAX_SAMPLE_SHARE = 16  # ...and at most one in this many, so the sample costs <= 1/16 of a pass
SMALLEST_POSITIVE = 5e-324  # |estimate| >= this: every nonzero estimate


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
    table[j, col] += sketch_sign(hashes[j, 2], hashes[j, 3], i, table.shape[1]) * value


@njit(nogil=True, cache=True)
def _add_run(counters, values, negative):
    # views indexed from 0: Numba drops the negative-index check and vectorizes (4x faster)
    if negative:
        for t in range(values.size):
            counters[t] -= values[t]
    else:
        for t in range(values.size):
            counters[t] += values[t]


@njit(nogil=True, cache=True)
def _insert_range(table, hashes, x, lo, hi):
    # lo starts a block. A row at a time over the whole range: the row (2 MB at 500K columns)
    # stays in L2 while x streams past, where taking all rows per block sent the adds to L3,
    # which the other ranks of a host share (0.05 s against 0.19-0.37 s for 25M into 5 x 500K).
    # Each block is one contiguous run of adds (two where it wraps around the row).
    rows, columns = table.shape
    shift = sketch_block_shift(columns)
    width = 1 << shift
    nonfinite = 0
    checked = x[lo:hi]  # a view indexed from 0 vectorizes: 3 ms against 23 ms at 25M
    for t in range(checked.size):
        nonfinite += not abs(checked[t]) < np.inf
    for j in range(rows):
        bucket_a, bucket_b, sign_a, sign_b = hashes[j, 0], hashes[j, 1], hashes[j, 2], hashes[j, 3]
        for start in range(lo, hi, width):
            values = x[start : min(start + width, hi)]
            block = np.uint64(start) >> shift
            first = np.int64(block_start(bucket_a, bucket_b, block, columns))
            head = min(values.size, columns - first)
            negative = block_is_negative(sign_a, sign_b, block)
            _add_run(table[j, first : first + head], values[:head], negative)
            _add_run(table[j, : values.size - head], values[head:], negative)
    return nonfinite


@njit(parallel=True, nogil=True, cache=True)
def _insert_dense_cpu(table, hashes, x, parts):
    # each part adds into a private table, so threads never write the same counter; parts
    # start on block boundaries
    n = x.size
    private = np.zeros((parts, table.shape[0], table.shape[1]), table.dtype)
    width = 1 << sketch_block_shift(table.shape[1])
    step = ((n + parts - 1) // parts + width - 1) // width * width
    nonfinite = np.zeros(parts, np.int64)
    for p in prange(parts):
        nonfinite[p] = _insert_range(private[p], hashes, x, min(p * step, n), min(p * step + step, n))
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
            out[t] = row_estimate(table, hashes, idx[t], buf)


@njit(parallel=True, nogil=True, cache=True)
def _sample_cpu(table, hashes, stride, out):
    nchunks = (out.size + QUERY_CHUNK - 1) // QUERY_CHUNK
    for c in prange(nchunks):
        buf = np.empty(table.shape[0], np.float64)
        for t in range(c * QUERY_CHUNK, min((c + 1) * QUERY_CHUNK, out.size)):
            out[t] = abs(row_estimate(table, hashes, t * stride, buf))


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
    # one part adds into the table itself: a private table would cost three more passes over it
    bad = _insert_range(table, hashes, x, 0, x.size) if parts == 1 else _insert_dense_cpu(table, hashes, x, parts)
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


def _recovery_sample(size: int, k: int) -> tuple[int, int]:
    """(stride, count) of the coordinates whose estimates set the first threshold."""
    wanted = max(MIN_SAMPLE, SAMPLE_HITS * size // max(k, 1))
    stride = max(1, size // wanted, min(MAX_SAMPLE_SHARE, size // MIN_SAMPLE))
    return stride, -(-size // stride)


def _recover(size: int, k: int, sample: Callable[[int, int], np.ndarray],
             candidates: Callable[[float, int], tuple[np.ndarray, np.ndarray]],
             query: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The k largest ``|estimate|`` of ``[0, size)`` as (sorted indices, estimates), on the host.

    1. Estimate every ``stride``-th coordinate; the sample's magnitude at the rank that predicts
       k (plus four standard deviations) above it is the threshold.
    2. One candidate pass keeps every coordinate whose ``|estimate| >= threshold``.
    3. Fewer than k: lower the threshold (rank x4) and pass again; at the bottom the threshold
       is the smallest positive float, which keeps every nonzero estimate, and the rest of the
       k are the lowest-index coordinates whose estimate is zero (as ``topk_exact`` breaks ties).
    4. The exact top k of the candidates: a coordinate outside them has a smaller ``|estimate|``
       than all of them, so this is the top k of all coordinates, ties to the lower index.
    The backends only evaluate estimates; every decision is here, on values identical on every
    rank that holds the same table, so all ranks recover the same coordinates.
    """
    if k == 0 or size == 0:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    stride, count = _recovery_sample(size, k)
    magnitudes = sample(stride, count)
    expected = count * k / size
    rank = math.ceil(expected + 4.0 * math.sqrt(expected) + 8.0)
    while True:
        threshold = SMALLEST_POSITIVE
        if rank <= count:
            threshold = max(SMALLEST_POSITIVE, float(np.partition(magnitudes, count - rank)[count - rank]))
        idx, est = candidates(threshold, math.ceil(size * min(1.0, rank / count)))
        if idx.size >= k or threshold == SMALLEST_POSITIVE:
            break
        rank *= 4
    if idx.size < k:  # every coordinate outside idx has a zero estimate
        zeros = np.setdiff1d(np.arange(min(size, k + idx.size), dtype=np.int64), idx, assume_unique=True)
        zeros = zeros[: k - idx.size]
        order = np.argsort(np.concatenate([idx, zeros]), kind="stable")
        return np.concatenate([idx, zeros])[order], np.concatenate([est, query(zeros)])[order]
    chosen, values = topk_exact(est, k)
    return idx[chosen], values


def _candidates_host(table: np.ndarray, hashes: np.ndarray, size: int, threshold: float,
                     expected: int) -> tuple[np.ndarray, np.ndarray]:
    del expected  # the survivor count sizes the CPU pass exactly; the GPU's slots need a guess
    return candidates_host(table, hashes, size, threshold)


def sketch_heavy_hitters(table: Any, hashes: np.ndarray, size: int, k: int) -> tuple[Any, Any]:
    """The k coordinates of ``[0, size)`` with the largest ``|estimate|``, as (sorted indices, estimates).

    Ties go to the lower index, as in :func:`~.select.topk_exact` over every estimate; no
    d-sized array is built (see :func:`_recover`).
    """
    _check_table(table, hashes)
    if size < 0:
        raise InvalidArgumentError(f"size must be >= 0, not {size}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= size:
        raise InvalidArgumentError(f"k={k} is outside [0, {size}]")
    if backend_of(table) == CUDA:
        from . import _sketch_cuda

        idx, values = _recover(size, int(k), *_sketch_cuda.recovery_steps(table, hashes, size))
        return wrap_like(table, to_device(idx)), wrap_like(table, to_device(values.astype(table.dtype)))

    def sample(stride: int, count: int) -> np.ndarray:
        out = np.empty(count, np.float64)
        _sample_cpu(table, hashes, stride, out)
        return out

    def query(idx: np.ndarray) -> np.ndarray:
        out = np.empty(idx.size, np.float64)
        _query_cpu(table, hashes, idx, out)
        return out

    return _recover(size, int(k), sample,
                    lambda threshold, expected: _candidates_host(table, hashes, size, threshold, expected), query)
