"""CUDA kernels behind ``random_sparsify``: the greedy scale's reductions and the kept compaction."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda, njit

from ._cuda_compact import THREADS, compact, make_compaction
from .random_sparsify import budget_scale, greedy_scale, is_kept, keep_probability
from ._dispatch import launch_stream, to_device, to_host

ITEMS_PER_THREAD = 16


@njit(nogil=True, cache=True)
def _value_nonfinite(x, i, lam, unused):
    return not abs(x[i]) < np.inf


@cuda.jit
def _scale_sums_kernel(x, lam, out):
    # out: [saturated count, sum |x| over the rest, their sum of squares, sum of all squares,
    # NaN/inf count], accumulated atomically (scale_sums' CUDA twin)
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    saturated = 0.0
    rest = 0.0
    rest_squares = 0.0
    squares = 0.0
    bad = 0.0
    for i in range(start, x.size, stride):
        a = abs(np.float64(x[i]))
        if not a < np.inf:
            bad += 1.0
            continue
        squares += a * a
        if lam * a >= 1.0:
            saturated += 1.0
        else:
            rest += a
            rest_squares += a * a
    cuda.atomic.add(out, 0, saturated)
    cuda.atomic.add(out, 1, rest)
    cuda.atomic.add(out, 2, rest_squares)
    cuda.atomic.add(out, 3, squares)
    cuda.atomic.add(out, 4, bad)


@cuda.jit
def _scale_kernel(x, lam, idx, out):
    t = cuda.grid(1)
    if t < idx.size:
        value = x[idx[t]]
        out[t] = value / keep_probability(value, lam)


def _scale_sums(x: Any, lam: float) -> tuple[int, float, float, float, int]:
    out = to_device(np.zeros(5, np.float64))
    blocks = max(1, -(-x.size // (THREADS * ITEMS_PER_THREAD)))
    if x.size:
        _scale_sums_kernel[blocks, THREADS, launch_stream()](x, lam, out)
    saturated, rest, rest_squares, squares, bad = to_host(out)
    return int(saturated), float(rest), float(rest_squares), float(squares), int(bad)


def random_sparsify(x: Any, density: float | None, seed: int,
                    variance_budget: float | None = None) -> tuple[Any, Any]:
    if variance_budget is not None:
        lam = budget_scale(lambda scale: _scale_sums(x, scale), variance_budget)
    else:
        lam = greedy_scale(lambda scale: _scale_sums(x, scale), x.size, density)
    kernels = make_compaction(is_kept, _value_nonfinite)
    idx, _ = compact(kernels, x, lam, np.uint64(seed), 0)
    out = cuda.device_array(idx.size, x.dtype)
    if idx.size:
        _scale_kernel[max(1, -(-idx.size // THREADS)), THREADS, launch_stream()](x, lam, idx, out)
    return idx, out
