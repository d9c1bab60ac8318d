"""CUDA kernels behind ``sparse``: atomic scatter-add, gather, and a merge by binary-search ranks.

The merge places ``a[i]`` at ``i + (number of b below it)`` and ``b[j]`` at ``j + (number of a
at or below it)``, so equal indices land side by side (a first); a compaction then keeps the
first of each pair and a last kernel sums the pairs. Every step is data-parallel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda, njit

from sparsecoll.errors import InvalidArgumentError

from ._cuda_compact import THREADS, compact, device_function, make_compaction
from ._dispatch import as_device_vector, launch_stream, wrap_like


@njit(nogil=True, cache=True)
def lower_bound(sorted_values, x):
    """Number of entries of ``sorted_values`` below ``x``."""
    lo = 0
    hi = sorted_values.size
    while lo < hi:
        mid = (lo + hi) // 2
        if sorted_values[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(nogil=True, cache=True)
def upper_bound(sorted_values, x):
    """Number of entries of ``sorted_values`` at or below ``x``."""
    lo = 0
    hi = sorted_values.size
    while lo < hi:
        mid = (lo + hi) // 2
        if sorted_values[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return lo


lower_bound_device = device_function(lower_bound)
upper_bound_device = device_function(upper_bound)


@njit(nogil=True, cache=True)
def _run_head(merged_idx, p, unused_a, unused_b):
    return p == 0 or merged_idx[p] != merged_idx[p - 1]


@njit(nogil=True, cache=True)
def _never(x, i, a, c):
    return False


@cuda.jit
def _scatter_add_kernel(dense, idx, val):
    j = cuda.grid(1)
    if j < idx.size:
        cuda.atomic.add(dense, idx[j], val[j])


@cuda.jit
def _gather_kernel(dense, idx, out):
    j = cuda.grid(1)
    if j < idx.size:
        out[j] = dense[idx[j]]


@cuda.jit
def _place_kernel(idx_own, val_own, idx_other, own_first, out_idx, out_val):
    j = cuda.grid(1)
    if j < idx_own.size:
        if own_first:
            pos = j + lower_bound_device(idx_other, idx_own[j])
        else:
            pos = j + upper_bound_device(idx_other, idx_own[j])
        out_idx[pos] = idx_own[j]
        out_val[pos] = val_own[j]


@cuda.jit
def _sum_runs_kernel(heads, merged_idx, merged_val, out_val):
    q = cuda.grid(1)
    if q < heads.size:
        p = heads[q]
        total = merged_val[p]
        if p + 1 < merged_idx.size and merged_idx[p + 1] == merged_idx[p]:
            total += merged_val[p + 1]
        out_val[q] = total


def _blocks(n: int) -> int:
    return max(1, -(-n // THREADS))


def scatter_add(dense: Any, indices: Any, values: Any) -> None:
    target = as_device_vector(dense)
    if target.dtype not in (np.float32, np.float64):
        raise InvalidArgumentError(f"CUDA scatter_add needs float32/float64 dense, not {target.dtype}")
    idx, val = as_device_vector(indices), as_device_vector(values)
    if idx.size != val.size:
        raise InvalidArgumentError(f"scatter_add: {idx.size} indices but {val.size} values")
    if idx.size:
        _scatter_add_kernel[_blocks(idx.size), THREADS, launch_stream()](target, idx, val)


def gather(dense: Any, indices: Any) -> Any:
    source, idx = as_device_vector(dense), as_device_vector(indices)
    out = cuda.device_array(idx.size, source.dtype)
    if idx.size:
        _gather_kernel[_blocks(idx.size), THREADS, launch_stream()](source, idx, out)
    return wrap_like(dense, out)


def merge_sorted(idx_a: Any, val_a: Any, idx_b: Any, val_b: Any) -> tuple[Any, Any]:
    ia, va = as_device_vector(idx_a), as_device_vector(val_a)
    ib, vb = as_device_vector(idx_b), as_device_vector(val_b)
    if ia.size != va.size or ib.size != vb.size:
        raise InvalidArgumentError("merge_sorted: indices and values differ in length")
    dtype = np.result_type(va.dtype, vb.dtype)
    if va.dtype != vb.dtype:
        raise InvalidArgumentError(f"merge_sorted on CUDA needs one value dtype, got {va.dtype}/{vb.dtype}")
    total = ia.size + ib.size
    merged_idx = cuda.device_array(total, np.int64)
    merged_val = cuda.device_array(total, dtype)
    if ia.size:
        _place_kernel[_blocks(ia.size), THREADS, launch_stream()](ia, va, ib, True, merged_idx, merged_val)
    if ib.size:
        _place_kernel[_blocks(ib.size), THREADS, launch_stream()](ib, vb, ia, False, merged_idx, merged_val)
    heads, head_idx = compact(make_compaction(_run_head, _never), merged_idx, 0, 0, 0)
    out_val = cuda.device_array(heads.size, dtype)
    if heads.size:
        _sum_runs_kernel[_blocks(heads.size), THREADS, launch_stream()](heads, merged_idx, merged_val, out_val)
    return wrap_like(idx_a, head_idx), wrap_like(val_a, out_val)
