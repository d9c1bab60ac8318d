"""CPU (``@njit``) passes behind selection: counting, compaction, histograms, sampling.

Every pass works on the unsigned-integer keys of ``_dispatch.KeyFormat``: ``bits & mask`` orders
like ``|x|`` and ``key >= inf_key`` marks NaN/inf, so one compiled kernel serves every float dtype
and the NaN check rides along with the pass that reads the data anyway.

Inner loops walk a slice ``view = bits[lo:hi]`` from 0: with an index Numba can prove
non-negative it drops the negative-index wraparound and LLVM vectorizes the loop (about 5x
faster than ``for i in range(lo, hi): bits[i]``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._scalar import uniform01

CHUNK = 1 << 16  # elements per parallel work item: large enough to amortize, small enough to balance
RUN = 64  # keys reduced to one maximum before a run is scanned: a few vector registers


@njit(parallel=True, nogil=True, cache=True)
def count_at_least(bits, mask, key_min, inf_key, chunk):
    """Per-chunk counts of keys >= key_min, and the number of NaN/inf keys."""
    n = bits.size
    nchunks = (n + chunk - 1) // chunk
    counts = np.zeros(nchunks, np.int64)
    bad = np.zeros(nchunks, np.int64)
    for c in prange(nchunks):
        lo = c * chunk
        hi = min(lo + chunk, n)
        view = bits[lo:hi]
        kept = 0
        nonfinite = 0
        for j in range(view.size):
            key = view[j] & mask
            kept += key >= key_min
            nonfinite += key >= inf_key
        counts[c] = kept
        bad[c] = nonfinite
    return counts, bad.sum()


@njit(parallel=True, nogil=True, cache=True)
def write_at_least(bits, mask, key_min, chunk, counts):
    """Compacts (index, raw bits) of keys >= key_min, in index order, given per-chunk counts."""
    n = bits.size
    nchunks = counts.size
    offsets = np.zeros(nchunks + 1, np.int64)
    for c in range(nchunks):
        offsets[c + 1] = offsets[c] + counts[c]
    out_idx = np.empty(offsets[nchunks], np.int64)
    out_bits = np.empty(offsets[nchunks], bits.dtype)
    for c in prange(nchunks):
        pos = offsets[c]
        lo = c * chunk
        view = bits[lo : min(lo + chunk, n)]
        for j in range(view.size):
            if (view[j] & mask) >= key_min:
                out_idx[pos] = lo + j
                out_bits[pos] = view[j]
                pos += 1
    return out_idx, out_bits


@njit(nogil=True, cache=True)
def scan_run(run, first, mask, key_min, inf_key, scan_from, slot_idx, slot_bits, base, kept, cap):
    """One run of keys (element ``first`` of the vector onward) into a chunk's slots from
    ``base``: the run is first reduced to its maximum (a branch-free loop LLVM vectorizes) and
    scanned only when that reaches ``scan_from``; keys >= ``key_min`` fill the slots up to
    ``cap`` and are all counted. Returns the chunk's new count and the run's NaN/inf count.
    Shared by ``select_capped`` and the fused pass (:mod:`._fused_cpu`)."""
    top = run[0] & mask
    for j in range(run.size):
        top = max(top, run[j] & mask)
    if top < scan_from:
        return kept, 0
    nonfinite = 0
    for j in range(run.size):
        raw = run[j]
        key = raw & mask
        if key >= key_min:
            if kept < cap:
                slot_idx[base + kept] = first + j
                slot_bits[base + kept] = raw
            kept += 1
        nonfinite += key >= inf_key
    return kept, nonfinite


@njit(parallel=True, nogil=True, cache=True)
def select_capped(bits, mask, key_min, inf_key, chunk, cap):
    """One-pass compaction of keys >= key_min into ``cap`` slots per chunk.

    Returns slots, per-chunk counts (which may exceed ``cap``) and the NaN/inf count; chunks that
    overflowed are redone by ``gather_slots``. With a threshold from a sample the expected count
    per chunk is known, so overflow is rare and the data is read once. Each run of ``RUN`` keys is
    first reduced to its maximum (a branch-free loop LLVM vectorizes) and scanned only when that
    maximum reaches ``key_min`` or marks a NaN/inf, so the NaN/inf count stays exact.
    """
    n = bits.size
    nchunks = (n + chunk - 1) // chunk
    slot_idx = np.empty(nchunks * cap, np.int64)
    slot_bits = np.empty(nchunks * cap, bits.dtype)
    counts = np.zeros(nchunks, np.int64)
    bad = np.zeros(nchunks, np.int64)
    scan_from = min(key_min, inf_key)
    for c in prange(nchunks):
        lo = c * chunk
        view = bits[lo : min(lo + chunk, n)]
        base = c * cap
        kept = 0
        nonfinite = 0
        for start in range(0, view.size, RUN):
            kept, found = scan_run(view[start : min(start + RUN, view.size)], lo + start, mask, key_min, inf_key,
                                   scan_from, slot_idx, slot_bits, base, kept, cap)
            nonfinite += found
        counts[c] = kept
        bad[c] = nonfinite
    return slot_idx, slot_bits, counts, bad.sum()


@njit(parallel=True, nogil=True, cache=True)
def gather_slots(bits, mask, key_min, chunk, cap, slot_idx, slot_bits, counts):
    """Concatenates the slots of ``select_capped``, rescanning the chunks that overflowed."""
    n = bits.size
    nchunks = counts.size
    offsets = np.zeros(nchunks + 1, np.int64)
    for c in range(nchunks):
        offsets[c + 1] = offsets[c] + counts[c]
    out_idx = np.empty(offsets[nchunks], np.int64)
    out_bits = np.empty(offsets[nchunks], bits.dtype)
    for c in prange(nchunks):
        pos = offsets[c]
        if counts[c] <= cap:
            base = c * cap
            for j in range(counts[c]):
                out_idx[pos + j] = slot_idx[base + j]
                out_bits[pos + j] = slot_bits[base + j]
        else:
            lo = c * chunk
            view = bits[lo : min(lo + chunk, n)]
            for j in range(view.size):
                if (view[j] & mask) >= key_min:
                    out_idx[pos] = lo + j
                    out_bits[pos] = view[j]
                    pos += 1
    return out_idx, out_bits


@njit(parallel=True, nogil=True, cache=True)
def chunk_histograms(bits, mask, shift, inf_key, chunk, nbuckets):
    """Per-chunk histograms of ``key >> shift`` (the top bits of |x|), and the NaN/inf count."""
    n = bits.size
    nchunks = (n + chunk - 1) // chunk
    hist = np.zeros((nchunks, nbuckets), np.int64)
    bad = np.zeros(nchunks, np.int64)
    for c in prange(nchunks):
        lo = c * chunk
        hi = min(lo + chunk, n)
        view = bits[lo:hi]
        counts = hist[c]
        nonfinite = 0
        for j in range(view.size):
            key = view[j] & mask
            counts[np.int64(key >> shift)] += 1
            nonfinite += key >= inf_key
        bad[c] = nonfinite
    return hist, bad.sum()


@njit(nogil=True, cache=True)
def sample_keys(bits, mask, seed, nblocks, block):
    """Keys of ``nblocks`` runs of ``block`` consecutive elements at seeded random starts.

    Runs, not single elements, because a random read costs a cache line either way.
    """
    n = bits.size
    starts = n - block + 1
    out = np.empty(nblocks * block, bits.dtype)
    for b in range(nblocks):
        start = np.int64(uniform01(seed, b) * starts)
        for j in range(block):
            out[b * block + j] = bits[start + j] & mask
    return out
