"""CUDA (``@cuda.jit``) passes behind selection; imported only when a CUDA array arrives.

Selection runs on device keys (``bits & mask``); the small candidate set that the exact-k
correction needs is finished on the host, like the CPU path, so both give the same answer.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, int32, njit

from ._cuda_compact import THREADS, compact, make_compaction
from ._dispatch import KeyFormat, launch_stream, nonfinite_error, to_device, to_host
from ._scalar import uniform01

HIST_BUCKETS = 4096  # a 16 KiB shared-memory histogram per block
HIST_ITEMS_PER_THREAD = 64


@njit(nogil=True, cache=True)
def key_at_least(bits, i, mask, key_min):
    return (bits[i] & mask) >= key_min


@njit(nogil=True, cache=True)
def key_nonfinite(bits, i, mask, inf_key):
    return (bits[i] & mask) >= inf_key


@cuda.jit
def _histogram_kernel(bits, mask, shift, hist):
    local = cuda.shared.array(HIST_BUCKETS, int32)
    t = cuda.threadIdx.x
    for b in range(t, HIST_BUCKETS, THREADS):
        local[b] = 0
    cuda.syncthreads()
    span = THREADS * HIST_ITEMS_PER_THREAD
    lo = cuda.blockIdx.x * span
    hi = min(lo + span, bits.size)
    for i in range(lo + t, hi, THREADS):
        cuda.atomic.add(local, int32((bits[i] & mask) >> shift), 1)
    cuda.syncthreads()
    for b in range(t, HIST_BUCKETS, THREADS):
        if local[b]:
            cuda.atomic.add(hist, b, local[b])


@cuda.jit
def _sample_kernel(bits, mask, seed, block, out):
    run = cuda.grid(1)
    runs = out.size // block
    if run < runs:
        start = np.int64(uniform01(seed, run) * (bits.size - block + 1))
        for j in range(block):
            out[run * block + j] = bits[start + j] & mask


def threshold_candidates(bits, fmt: KeyFormat, key_min) -> tuple[np.ndarray, np.ndarray]:
    """Device (indices, raw bits) of keys >= key_min, in index order; raises on NaN/inf."""
    kernels = make_compaction(key_at_least, key_nonfinite)
    return compact(kernels, bits, fmt.mask, key_min, fmt.inf_key)


def histogram(bits, fmt: KeyFormat) -> tuple[np.ndarray, int]:
    """Host histogram of the top 12 bits of the keys, and the shift that produced it."""
    shift = fmt.key_dtype.type(fmt.key_bits - 12)
    hist = to_device(np.zeros(HIST_BUCKETS, np.int64))
    span = THREADS * HIST_ITEMS_PER_THREAD
    blocks = max(1, -(-bits.size // span))
    if bits.size:
        _histogram_kernel[blocks, THREADS, launch_stream()](bits, fmt.mask, shift, hist)
    host = to_host(hist)
    flagged = int(host[int(fmt.inf_key) >> int(shift) :].sum())
    if flagged:
        raise nonfinite_error(flagged)
    return host, int(shift)


def sample(bits, fmt: KeyFormat, seed: int, runs: int, block: int) -> np.ndarray:
    """Host copy of the sampled keys (same positions as the CPU sampler for the same seed)."""
    out = cuda.device_array(runs * block, fmt.key_dtype)
    _sample_kernel[max(1, -(-runs // THREADS)), THREADS, launch_stream()](bits, fmt.mask, np.uint64(seed), block, out)
    return to_host(out)
