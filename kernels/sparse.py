"""Sparse-vector helpers: scatter-add, gather, merge of sorted sparse vectors, top-k of a sparse vector.

A sparse vector is ``(indices, values)`` with int64 indices; ``merge_sorted`` and ``topk_sparse``
expect strictly increasing indices (what the selection kernels return) and keep them so.
Merging then keeping the top k is the inner step of gTop-k.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from sparsecoll.errors import InvalidArgumentError

from ._dispatch import CUDA, as_device_vector, as_host_vector, backend_of, float_dtype, wrap_like
from .select import topk_exact


@njit(nogil=True, cache=True)
def _scatter_add(dense, idx, val):
    # sequential on purpose: duplicate indices must accumulate without races
    for j in range(idx.size):
        dense[idx[j]] += val[j]


@njit(parallel=True, nogil=True, cache=True)
def _gather(dense, idx, out):
    for j in prange(idx.size):
        out[j] = dense[idx[j]]


@njit(nogil=True, cache=True)
def _merge(idx_a, val_a, idx_b, val_b, out_idx, out_val):
    a = 0
    b = 0
    n = 0
    while a < idx_a.size and b < idx_b.size:
        if idx_a[a] < idx_b[b]:
            out_idx[n] = idx_a[a]
            out_val[n] = val_a[a]
            a += 1
        elif idx_b[b] < idx_a[a]:
            out_idx[n] = idx_b[b]
            out_val[n] = val_b[b]
            b += 1
        else:
            out_idx[n] = idx_a[a]
            out_val[n] = val_a[a] + val_b[b]
            a += 1
            b += 1
        n += 1
    while a < idx_a.size:
        out_idx[n] = idx_a[a]
        out_val[n] = val_a[a]
        a += 1
        n += 1
    while b < idx_b.size:
        out_idx[n] = idx_b[b]
        out_val[n] = val_b[b]
        b += 1
        n += 1
    return n


def _check_indices(idx: np.ndarray, size: int, name: str = "indices") -> np.ndarray:
    if idx.dtype.kind not in "iu":
        raise InvalidArgumentError(f"{name} must be integers, not {idx.dtype}")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise InvalidArgumentError(f"{name} fall outside [0, {size})")
    return idx.astype(np.int64, copy=False)


def _check_sorted(idx: np.ndarray, name: str) -> None:
    if idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1])):
        raise InvalidArgumentError(f"{name} must be strictly increasing")


def _check_pair(idx: Any, val: Any, name: str) -> None:
    if idx.size != val.size:
        raise InvalidArgumentError(f"{name}: {idx.size} indices but {val.size} values")


def scatter_add(dense: Any, indices: Any, values: Any) -> Any:
    """Adds ``values`` into ``dense`` at ``indices`` in place (duplicates accumulate); returns dense."""
    if backend_of(dense, indices, values) == CUDA:
        from . import _sparse_cuda

        _sparse_cuda.scatter_add(dense, indices, values)
        return dense
    if not isinstance(dense, np.ndarray) or not dense.flags.c_contiguous:
        raise InvalidArgumentError("dense must be a contiguous numpy array (updated in place)")
    flat = dense.reshape(-1)
    float_dtype(flat.dtype, "dense")
    idx = _check_indices(as_host_vector(indices), flat.size)
    val = as_host_vector(values)
    _check_pair(idx, val, "scatter_add")
    if flat.dtype.itemsize == 2:  # no float16 or bfloat16 arithmetic in Numba's CPU target: add in float32
        wide = flat.astype(np.float32)
        _scatter_add(wide, idx, val.astype(np.float32))
        flat[:] = wide
    else:
        _scatter_add(flat, idx, val.astype(flat.dtype, copy=False))
    return dense


def gather(dense: Any, indices: Any) -> Any:
    """``dense[indices]`` as a new flat array."""
    if backend_of(dense, indices) == CUDA:
        from . import _sparse_cuda

        return _sparse_cuda.gather(dense, indices)
    flat = as_host_vector(dense)
    idx = _check_indices(as_host_vector(indices), flat.size)
    out = np.empty(idx.size, flat.dtype)
    if flat.dtype.itemsize == 2:  # float16 or bfloat16: a copy moves bits
        _gather(flat.view(np.uint16), idx, out.view(np.uint16))
    else:
        _gather(flat, idx, out)
    return out


def merge_sorted(idx_a: Any, val_a: Any, idx_b: Any, val_b: Any) -> tuple[Any, Any]:
    """Union of two sparse vectors with sorted unique indices; values at shared indices are summed."""
    if backend_of(idx_a, val_a, idx_b, val_b) == CUDA:
        from . import _sparse_cuda

        return _sparse_cuda.merge_sorted(idx_a, val_a, idx_b, val_b)
    ia, ib = as_host_vector(idx_a), as_host_vector(idx_b)
    va, vb = as_host_vector(val_a), as_host_vector(val_b)
    _check_pair(ia, va, "first sparse vector")
    _check_pair(ib, vb, "second sparse vector")
    limit = np.iinfo(np.int64).max
    ia, ib = _check_indices(ia, limit, "first indices"), _check_indices(ib, limit, "second indices")
    _check_sorted(ia, "first indices")
    _check_sorted(ib, "second indices")
    dtype = np.result_type(va.dtype, vb.dtype)
    work = np.float32 if dtype.itemsize == 2 else dtype
    out_idx = np.empty(ia.size + ib.size, np.int64)
    out_val = np.empty(ia.size + ib.size, work)
    n = _merge(ia, va.astype(work, copy=False), ib, vb.astype(work, copy=False), out_idx, out_val)
    return out_idx[:n].copy(), out_val[:n].astype(dtype)


def topk_sparse(indices: Any, values: Any, k: int) -> tuple[Any, Any]:
    """The k entries of a sparse vector with largest ``|value|``, indices still ascending."""
    if backend_of(indices, values) == CUDA:
        from . import _sparse_cuda

        positions, top_values = topk_exact(values, k)
        return wrap_like(values, _sparse_cuda.gather(as_device_vector(indices), positions)), top_values
    idx = as_host_vector(indices)
    val = as_host_vector(values)
    _check_pair(idx, val, "topk_sparse")
    positions, top_values = topk_exact(val, k)
    return idx[positions], top_values
