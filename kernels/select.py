"""Selection by magnitude: exact top-k, fast sampled-threshold top-k, and threshold compaction.

Every function takes a float16/bfloat16/32/64 array (numpy, or any CUDA array), treats it as flat and
returns ``(indices, values)``: indices are int64, sorted ascending (so they can be
delta-encoded and merged without another sort); values are the signed input values at those
indices, in the input dtype and array library. Ties at the k-th magnitude go to the lower
index, so the exact and fast paths return the same set. NaN or inf input raises
``InvalidArgumentError``: a top-k over them has no meaning.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sparsecoll.errors import InvalidArgumentError

from . import _select_cpu as cpu
from ._dispatch import (
    CUDA,
    KeyFormat,
    as_device_vector,
    as_host_vector,
    backend_of,
    key_above,
    key_format,
    nonfinite_error,
    to_device,
    to_host,
    wrap_like,
)

FAST_MIN_SIZE = 1 << 16  # below this the exact path is as fast and needs no sample
SAMPLE_RUN = 16  # consecutive elements per sampled run: one 64-byte cache line of float32
SAMPLE_HITS = 256  # sampled elements expected above the threshold; sets the sample size
HIST_BYTES = 16 << 20  # memory for the per-chunk histograms of the exact path


def _check_k(k: int, size: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InvalidArgumentError(f"k must be an integer, not {type(k).__name__}")
    if not 0 <= k <= size:
        raise InvalidArgumentError(f"k={k} is outside [0, {size}] for an array of {size} elements")
    return int(k)


def _finish_exact_k(idx: np.ndarray, raw: np.ndarray, fmt: KeyFormat, k: int):
    """Keeps the k largest keys of an index-ordered candidate set; ties go to lower indices."""
    if idx.size <= k:
        return idx, raw
    keys = raw & fmt.mask
    kth = np.partition(keys, idx.size - k)[idx.size - k]
    keep = keys > kth
    need = k - int(np.count_nonzero(keep))
    if need:
        keep[np.flatnonzero(keys == kth)[:need]] = True
    return idx[keep], raw[keep]


def _host_result(idx: np.ndarray, raw: np.ndarray, dtype: np.dtype):
    return idx, raw.view(dtype)


def _device_result(template: Any, idx: np.ndarray, raw: np.ndarray, dtype: np.dtype):
    values = to_device(np.ascontiguousarray(raw).view(dtype))
    return wrap_like(template, to_device(idx)), wrap_like(template, values)


def _exact_host(bits: np.ndarray, fmt: KeyFormat, k: int):
    n = bits.size
    nbits = 12 if fmt.key_bits <= 31 else 16
    shift = fmt.key_bits - nbits
    nbuckets = 1 << nbits
    chunk = max(cpu.CHUNK * 4, -(-n // max(1, HIST_BYTES // (nbuckets * 8))))
    hist, bad = cpu.chunk_histograms(
        bits, fmt.mask, fmt.key_dtype.type(shift), fmt.inf_key, chunk, nbuckets
    )
    if bad:
        raise nonfinite_error(int(bad))
    if k == 0:
        return np.empty(0, np.int64), np.empty(0, fmt.key_dtype)
    at_least = np.cumsum(hist.sum(axis=0)[::-1])[::-1]  # at_least[b]: keys in buckets >= b
    bucket = int(np.flatnonzero(at_least >= k)[-1])
    per_chunk = hist[:, bucket:].sum(axis=1)
    key_min = fmt.key_dtype.type(bucket << shift)
    idx, raw = cpu.write_at_least(bits, fmt.mask, key_min, chunk, per_chunk)
    return _finish_exact_k(idx, raw, fmt, k)


def _exact_device(bits: Any, fmt: KeyFormat, k: int):
    from . import _select_cuda as gpu

    hist, shift = gpu.histogram(bits, fmt)
    if k == 0:
        return np.empty(0, np.int64), np.empty(0, fmt.key_dtype)
    at_least = np.cumsum(hist[::-1])[::-1]
    bucket = int(np.flatnonzero(at_least >= k)[-1])
    idx, raw = gpu.threshold_candidates(bits, fmt, fmt.key_dtype.type(bucket << shift))
    return _finish_exact_k(to_host(idx), to_host(raw), fmt, k)


def topk_exact(array: Any, k: int) -> tuple[Any, Any]:
    """The k entries of largest magnitude, exactly: a radix histogram, then one compaction.

    This is the reference the fast path is checked against; it reads the data twice.
    """
    if backend_of(array) == CUDA:
        device = as_device_vector(array)
        fmt = key_format(device.dtype)
        k = _check_k(k, device.size)
        idx, raw = _exact_device(device.view(fmt.key_dtype), fmt, k)
        return _device_result(array, idx, raw, device.dtype)
    host = as_host_vector(array)
    fmt = key_format(host.dtype)
    k = _check_k(k, host.size)
    idx, raw = _exact_host(host.view(fmt.key_dtype), fmt, k)
    return _host_result(idx, raw, host.dtype)


def _sample_threshold(sample: np.ndarray, n: int, k: int, approximate: bool):
    """Key whose rank in the sample predicts about k (or, with a safety margin, more) above it."""
    expected = sample.size * k / n
    rank = expected if approximate else expected + 4.0 * math.sqrt(expected) + 8.0
    rank = min(max(1, math.ceil(rank)), sample.size)
    return np.partition(sample, sample.size - rank)[sample.size - rank], rank / sample.size


def _sample_runs(n: int, k: int) -> int:
    return max(256, min(n // (4 * SAMPLE_RUN), math.ceil(SAMPLE_HITS * n / (k * SAMPLE_RUN))))


def topk_fast(array: Any, k: int, *, approximate: bool = False, seed: int = 0) -> tuple[Any, Any]:
    """Top-k by a threshold estimated from a seeded random sample, then one selection pass.

    With ``approximate=False`` the threshold is set a little low and the surplus is trimmed, so
    the result equals ``topk_exact`` (a sample that misses falls back to it). With
    ``approximate=True`` everything above the estimated threshold is returned, as DGC does: about
    k entries, the count is ``len(indices)``.
    """
    if backend_of(array) == CUDA:
        return _topk_fast_device(array, k, approximate, seed)
    host = as_host_vector(array)
    fmt = key_format(host.dtype)
    n = host.size
    k = _check_k(k, n)
    bits = host.view(fmt.key_dtype)
    if n < FAST_MIN_SIZE or k == 0 or k * 8 > n:
        return _host_result(*_exact_host(bits, fmt, k), host.dtype)
    sample = cpu.sample_keys(bits, fmt.mask, np.uint64(seed), _sample_runs(n, k), SAMPLE_RUN)
    key_min, fraction = _sample_threshold(sample, n, k, approximate)
    cap = int(2 * fraction * cpu.CHUNK) + 64
    slots = cpu.select_capped(bits, fmt.mask, key_min, fmt.inf_key, cpu.CHUNK, cap)
    slot_idx, slot_bits, counts, bad = slots
    if bad:
        raise nonfinite_error(int(bad))
    idx, raw = cpu.gather_slots(bits, fmt.mask, key_min, cpu.CHUNK, cap, slot_idx, slot_bits, counts)
    if not approximate:
        if idx.size < k:
            return _host_result(*_exact_host(bits, fmt, k), host.dtype)
        idx, raw = _finish_exact_k(idx, raw, fmt, k)
    return _host_result(idx, raw, host.dtype)


def _topk_fast_device(array: Any, k: int, approximate: bool, seed: int):
    from . import _select_cuda as gpu

    device = as_device_vector(array)
    fmt = key_format(device.dtype)
    n = device.size
    k = _check_k(k, n)
    bits = device.view(fmt.key_dtype)
    if n < FAST_MIN_SIZE or k == 0 or k * 8 > n:
        idx, raw = _exact_device(bits, fmt, k)
        return _device_result(array, idx, raw, device.dtype)
    sample = gpu.sample(bits, fmt, seed, _sample_runs(n, k), SAMPLE_RUN)
    key_min, _ = _sample_threshold(sample, n, k, approximate)
    idx_dev, raw_dev = gpu.threshold_candidates(bits, fmt, key_min)
    if approximate:
        return wrap_like(array, idx_dev), wrap_like(array, raw_dev.view(device.dtype))
    idx, raw = to_host(idx_dev), to_host(raw_dev)
    if idx.size < k:
        idx, raw = _exact_device(bits, fmt, k)
    else:
        idx, raw = _finish_exact_k(idx, raw, fmt, k)
    return _device_result(array, idx, raw, device.dtype)


def topk(
    array: Any, k: int, *, method: str = "fast", approximate: bool = False, seed: int = 0
) -> tuple[Any, Any]:
    """Top-k by magnitude; ``method`` is ``"fast"`` (sampled threshold) or ``"exact"``."""
    if method == "exact":
        if approximate:
            raise InvalidArgumentError("approximate=True needs method='fast'")
        return topk_exact(array, k)
    if method == "fast":
        return topk_fast(array, k, approximate=approximate, seed=seed)
    raise InvalidArgumentError(f"unknown top-k method {method!r} (use 'fast' or 'exact')")


def select_threshold(array: Any, threshold: float) -> tuple[Any, Any]:
    """All entries with ``|x| > threshold`` (Aji & Heafield's drop-the-small), in one compaction."""
    threshold = float(threshold)
    if backend_of(array) == CUDA:
        from . import _select_cuda as gpu

        device = as_device_vector(array)
        fmt = key_format(device.dtype)
        key_min = key_above(threshold, device.dtype)
        idx, raw = gpu.threshold_candidates(device.view(fmt.key_dtype), fmt, key_min)
        return wrap_like(array, idx), wrap_like(array, raw.view(device.dtype))
    host = as_host_vector(array)
    fmt = key_format(host.dtype)
    bits = host.view(fmt.key_dtype)
    key_min = key_above(threshold, host.dtype)
    counts, bad = cpu.count_at_least(bits, fmt.mask, key_min, fmt.inf_key, cpu.CHUNK)
    if bad:
        raise nonfinite_error(int(bad))
    return _host_result(*cpu.write_at_least(bits, fmt.mask, key_min, cpu.CHUNK, counts), host.dtype)


def estimate_threshold(array: Any, k: int, *, seed: int = 0) -> float:
    """A magnitude with about k entries above it (``|x| > t``), from a seeded sample, as DGC does.

    Reads only the sample; the selection itself is ``select_threshold``.
    """
    on_device = backend_of(array) == CUDA
    vector = as_device_vector(array) if on_device else as_host_vector(array)
    fmt = key_format(vector.dtype)
    n = vector.size
    k = _check_k(k, n)
    if k == 0:
        return math.inf
    runs = _sample_runs(n, k) * SAMPLE_RUN
    bits = vector.view(fmt.key_dtype)
    if on_device:
        from . import _select_cuda as gpu

        sample = gpu.sample(bits, fmt, seed, runs, 1)
    else:
        sample = cpu.sample_keys(bits, fmt.mask, np.uint64(seed), runs, 1)
    flagged = int(np.count_nonzero(sample >= fmt.inf_key))
    if flagged:
        raise nonfinite_error(flagged)
    key, _ = _sample_threshold(sample, n, k, approximate=True)
    if key == 0:
        return -1.0
    # the magnitude just below the sampled key, so that the sampled key itself passes ">"
    return float(np.asarray(key - 1, fmt.key_dtype).view(vector.dtype))
