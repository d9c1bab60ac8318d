"""CUDA kernels behind ``sketch``: atomic inserts (one thread per coordinate), queries, merge.

The hashes and the median are the same ``@njit`` functions the CPU kernels call.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda, float64

from sparsecoll.errors import InvalidArgumentError

from . import _scalar
from ._cuda_compact import THREADS, device_function
from ._scalar import sketch_bucket, sketch_sign
from .sketch import MAX_ROWS

median_of_first = device_function(_scalar.median_of_first)


@cuda.jit
def _insert_kernel(table, hashes, idx, val, dense, bad):
    t = cuda.grid(1)
    if t < val.size:
        i = t if dense else idx[t]
        value = val[t]
        if not abs(value) < np.inf:
            cuda.atomic.add(bad, 0, 1)
        for j in range(table.shape[0]):
            col = sketch_bucket(hashes[j, 0], hashes[j, 1], i, table.shape[1])
            cuda.atomic.add(table, (j, col), sketch_sign(hashes[j, 2], hashes[j, 3], i) * value)


@cuda.jit
def _query_kernel(table, hashes, idx, dense, out):
    t = cuda.grid(1)
    if t < out.size:
        i = t if dense else idx[t]
        buf = cuda.local.array(MAX_ROWS, float64)
        for j in range(table.shape[0]):
            col = sketch_bucket(hashes[j, 0], hashes[j, 1], i, table.shape[1])
            buf[j] = sketch_sign(hashes[j, 2], hashes[j, 3], i) * table[j, col]
        out[t] = median_of_first(buf, table.shape[0])


@cuda.jit
def _add_kernel(into, other):
    t = cuda.grid(1)
    if t < into.size:
        into[t] += other[t]


def _blocks(n: int) -> int:
    return max(1, -(-n // THREADS))


def _table(table: Any) -> Any:
    return table if type(table).__name__ == "FakeCUDAArray" else cuda.as_cuda_array(table)


def _insert(table: Any, hashes: np.ndarray, idx: Any, val: Any, dense: bool) -> None:
    device_table = _table(table)
    if val.dtype not in (np.float32, np.float64):
        raise InvalidArgumentError(f"CUDA sketch insert needs float32/float64 values, not {val.dtype}")
    bad = cuda.to_device(np.zeros(1, np.int64))
    if val.size:
        _insert_kernel[_blocks(val.size), THREADS](
            device_table, cuda.to_device(hashes), idx, val, dense, bad
        )
    flagged = int(bad.copy_to_host()[0])
    if flagged:
        raise InvalidArgumentError(f"values hold {flagged} NaN or inf value(s)")


def insert_dense(table: Any, hashes: np.ndarray, x: Any) -> None:
    _insert(table, hashes, x, x, True)


def insert_sparse(table: Any, hashes: np.ndarray, idx: Any, val: Any) -> None:
    if idx.size != val.size:
        raise InvalidArgumentError(f"{idx.size} indices but {val.size} values")
    _insert(table, hashes, idx, val, False)


def add_into(into: Any, other: Any) -> None:
    a, b = _table(into), _table(other)
    flat_a, flat_b = a.reshape(a.size), b.reshape(b.size)
    if a.size:
        _add_kernel[_blocks(a.size), THREADS](flat_a, flat_b)


def query(table: Any, hashes: np.ndarray, idx: Any) -> Any:
    device_table = _table(table)
    out = cuda.device_array(idx.size, device_table.dtype)
    if idx.size:
        _query_kernel[_blocks(idx.size), THREADS](device_table, cuda.to_device(hashes), idx, False, out)
    return out


def query_all(table: Any, hashes: np.ndarray, size: int) -> Any:
    device_table = _table(table)
    out = cuda.device_array(size, device_table.dtype)
    if size:
        _query_kernel[_blocks(size), THREADS](device_table, cuda.to_device(hashes), out, True, out)
    return out
