"""Order-preserving parallel compaction on CUDA: per-block counts, a prefix sum, per-block writes.

``make_compaction(keep, nonfinite)`` builds the two kernels for a predicate ``keep(x, i, a, b)``
and a check ``nonfinite(x, i, a, c)`` (``a``, ``b``, ``c`` are scalar parameters); ``compact``
runs them and returns the kept (indices, values) in index order. Imported only when a CUDA
array arrives.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np
from numba import config, cuda, int64

from ._dispatch import launch_stream, nonfinite_error, to_device, to_host

# threads per block; the shared-memory scan is sized by it. The simulator runs each thread as a
# Python thread, so it gets small blocks (which also puts several blocks in its small tests).
THREADS = 32 if config.ENABLE_CUDASIM else 256
TILES_PER_BLOCK = 16  # each block walks this many tiles of THREADS elements


def _scan_block(flags, t):
    """Inclusive Hillis-Steele scan of ``flags`` (THREADS entries) in shared memory."""
    step = 1
    while step < THREADS:
        add = flags[t - step] if t >= step else 0
        cuda.syncthreads()
        flags[t] += add
        cuda.syncthreads()
        step *= 2


scan_block = cuda.jit(device=True)(_scan_block)


def device_function(function: Callable) -> Any:
    """A CUDA device function from an ``@njit`` one that takes arrays.

    Scalar ``@njit`` helpers are called from kernels as they are; helpers that index arrays are
    recompiled from their Python source as device functions (the CUDA simulator cannot pass its
    arrays into CPU-compiled code).
    """
    return cuda.jit(device=True)(getattr(function, "py_func", function))


@functools.cache
def make_compaction(keep: Callable, nonfinite: Callable) -> tuple[Any, Any]:
    """Count and write kernels for the predicate ``keep`` (``nonfinite`` flags NaN/inf input)."""
    keep = device_function(keep)
    nonfinite = device_function(nonfinite)

    @cuda.jit
    def count_kernel(x, a, b, c, span, counts, bad):
        lo = cuda.blockIdx.x * span
        hi = min(lo + span, x.size)
        kept = 0
        flagged = 0
        for i in range(lo + cuda.threadIdx.x, hi, THREADS):
            if keep(x, i, a, b):
                kept += 1
            if nonfinite(x, i, a, c):
                flagged += 1
        cuda.atomic.add(counts, cuda.blockIdx.x, kept)
        if flagged:
            cuda.atomic.add(bad, 0, flagged)

    @cuda.jit
    def write_kernel(x, a, b, span, offsets, out_idx, out_val):
        # each thread owns a run of span / THREADS consecutive elements: it counts its run,
        # one block-wide scan turns counts into positions, then it writes its run in order
        counts = cuda.shared.array(THREADS, int64)
        t = cuda.threadIdx.x
        per_thread = span // THREADS
        start = cuda.blockIdx.x * span + t * per_thread
        stop = min(start + per_thread, x.size)
        kept = 0
        for i in range(start, stop):
            if keep(x, i, a, b):
                kept += 1
        counts[t] = kept
        cuda.syncthreads()
        scan_block(counts, t)
        pos = offsets[cuda.blockIdx.x] + counts[t] - kept
        for i in range(start, stop):
            if keep(x, i, a, b):
                out_idx[pos] = i
                out_val[pos] = x[i]
                pos += 1

    return count_kernel, write_kernel


def compact(
    kernels: tuple[Any, Any], x: Any, a: Any, b: Any, c: Any, name: str = "array"
) -> tuple[Any, Any]:
    """Runs a compaction on device array ``x``; raises for NaN/inf; returns device (idx, values)."""
    count_kernel, write_kernel = kernels
    n = x.size
    span = THREADS * TILES_PER_BLOCK
    blocks = max(1, -(-n // span))
    counts = to_device(np.zeros(blocks, np.int64))
    bad = to_device(np.zeros(1, np.int64))
    if n:
        count_kernel[blocks, THREADS, launch_stream()](x, a, b, c, span, counts, bad)
    flagged = int(to_host(bad)[0])
    if flagged:
        raise nonfinite_error(flagged, name)
    host_counts = to_host(counts)
    offsets = np.zeros(blocks, np.int64)
    np.cumsum(host_counts[:-1], out=offsets[1:])
    total = int(host_counts.sum())
    out_idx = cuda.device_array(total, np.int64)
    out_val = cuda.device_array(total, x.dtype)
    if total:
        write_kernel[blocks, THREADS, launch_stream()](x, a, b, span, to_device(offsets), out_idx, out_val)
    return out_idx, out_val
