"""CUDA kernels behind ``sketch``: atomic inserts (one thread per coordinate), queries, merge,
and the steps of heavy-hitter recovery.

The hashes, the median, the hot map and the cold-row filter are the same ``@njit`` functions the
CPU kernels call (:mod:`._sketch_scalar`), and ``sketch._recover`` drives both backends with the
same decisions, so CPU and GPU recover the same coordinates from the same table. Recovery here:
a strided sample of estimates, a hot-map kernel (one thread per 32-counter word), and one
candidate pass (one thread per coordinate) that appends survivors through an atomic counter;
the host sorts them by index, so the order of the atomics does not matter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import cuda, float64

from sparsecoll.errors import InvalidArgumentError

from . import _scalar
from ._cuda_compact import THREADS, device_function
from . import _sketch_scalar
from ._scalar import sketch_bucket, sketch_sign
from ._sketch_scalar import allowed_cold_rows, hot_words
from .sketch import MAX_ROWS
from ._dispatch import launch_stream, to_device, to_host

median_of_first = device_function(_scalar.median_of_first)
hot_word = device_function(_sketch_scalar.hot_word)
cold_rows_exceed = device_function(_sketch_scalar.cold_rows_exceed)


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
            cuda.atomic.add(table, (j, col), sketch_sign(hashes[j, 2], hashes[j, 3], i, table.shape[1]) * value)


@cuda.jit(device=True)
def _estimate(table, hashes, i):
    buf = cuda.local.array(MAX_ROWS, float64)
    for j in range(table.shape[0]):
        col = sketch_bucket(hashes[j, 0], hashes[j, 1], i, table.shape[1])
        buf[j] = sketch_sign(hashes[j, 2], hashes[j, 3], i, table.shape[1]) * table[j, col]
    return median_of_first(buf, table.shape[0])


@cuda.jit
def _query_kernel(table, hashes, idx, stride, out):
    # stride 0: the coordinates in idx; stride s > 0: |estimate| of coordinates 0, s, 2s, ...
    t = cuda.grid(1)
    if t < out.size:
        if stride:
            out[t] = abs(_estimate(table, hashes, t * stride))
        else:
            out[t] = _estimate(table, hashes, idx[t])


@cuda.jit
def _hot_map_kernel(table, threshold, hot):
    w = cuda.grid(1)
    words = hot.shape[1]
    if w < hot.size:
        hot[w // words, w % words] = hot_word(table, w // words, w % words, threshold)


@cuda.jit
def _candidates_kernel(table, hashes, hot, size, threshold, allowed, slot_idx, slot_est, count):
    i = cuda.grid(1)
    if i < size and not cold_rows_exceed(hot, hashes, i, table.shape[1], allowed):
        value = _estimate(table, hashes, i)
        if abs(value) >= threshold:
            slot = cuda.atomic.add(count, 0, 1)
            if slot < slot_idx.size:
                slot_idx[slot] = i
                slot_est[slot] = value


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
    bad = to_device(np.zeros(1, np.int64))
    if val.size:
        _insert_kernel[_blocks(val.size), THREADS, launch_stream()](
            device_table, to_device(hashes), idx, val, dense, bad
        )
    flagged = int(to_host(bad)[0])
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
        _add_kernel[_blocks(a.size), THREADS, launch_stream()](flat_a, flat_b)


def query(table: Any, hashes: np.ndarray, idx: Any) -> Any:
    device_table = _table(table)
    out = cuda.device_array(idx.size, device_table.dtype)
    if idx.size:
        _query_kernel[_blocks(idx.size), THREADS, launch_stream()](device_table, to_device(hashes), idx, 0, out)
    return out


def recovery_steps(table: Any, hashes: np.ndarray, size: int) -> tuple[Callable, Callable, Callable]:
    """``sketch._recover``'s sample, candidates and query steps on the device; host arrays out."""
    device_table = _table(table)
    device_hashes = to_device(hashes)
    allowed = allowed_cold_rows(device_table.shape[0])

    def sample(stride: int, count: int) -> np.ndarray:
        out = cuda.device_array(count, np.float64)
        _query_kernel[_blocks(count), THREADS, launch_stream()](device_table, device_hashes, out, stride, out)
        return to_host(out)

    def candidates(threshold: float, expected: int) -> tuple[np.ndarray, np.ndarray]:
        rows, columns = device_table.shape
        hot = cuda.device_array((rows, hot_words(columns)), np.uint32)
        _hot_map_kernel[_blocks(hot.size), THREADS, launch_stream()](device_table, threshold, hot)
        cap = 2 * expected + 64
        while True:
            slot_idx = cuda.device_array(cap, np.int64)
            slot_est = cuda.device_array(cap, np.float64)
            count = to_device(np.zeros(1, np.int64))
            _candidates_kernel[_blocks(size), THREADS, launch_stream()](device_table, device_hashes, hot, size, threshold,
                                                        allowed, slot_idx, slot_est, count)
            found = int(to_host(count)[0])
            if found <= cap:
                break
            cap = found  # more survivors than room (rare): redo with room for all
        idx, est = to_host(slot_idx[:found]), to_host(slot_est[:found])
        order = np.argsort(idx, kind="stable")
        return idx[order], est[order]

    def query_host(idx: np.ndarray) -> np.ndarray:
        out = cuda.device_array(idx.size, np.float64)
        if idx.size:
            _query_kernel[_blocks(idx.size), THREADS, launch_stream()](device_table, device_hashes, to_device(idx), 0, out)
        return to_host(out)

    return sample, candidates, query_host
