"""CPU (``@njit``) passes of the fused error-feedback step (see :mod:`.fused`).

``accumulate`` walks one contiguous segment of a bucket in parallel chunks; within a chunk it
handles runs of ``RUN`` elements twice: first the arithmetic (loads, momentum, residual, stores;
a loop with loop-invariant branches only), then the selection's candidate scan of the run's keys,
which are still in cache (the same run-maximum skip as ``_select_cpu.select_capped``). So the
gradient, momentum and residual are each read once and written once, and selection costs no
pass of its own. ``sample_keys`` computes the step's values at a seeded sample of positions,
without writing anything, so that the threshold is known before the pass.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._fused_scalar import corrected, folded_gradient, load, rounded, step_element, stored_bits
from ._scalar import uniform01
from ._select_cpu import scan_run

RUN = 1024  # elements computed, then scanned, while they are in L1/L2


@njit(parallel=True, nogil=True, cache=True)
def accumulate(grad, param, momentum, residual, send_bits, send_to_grad, zero_grad, scale, weight_decay,
               momentum_factor, nesterov, beta, mask, key_min, inf_key, chunk, cap):
    """One pass over a segment: fold, correct, accumulate, store, and collect candidate slots.

    ``param`` is empty without weight decay, ``momentum`` empty without momentum. The step's
    value ``p`` goes to ``grad`` when ``send_to_grad`` (and the residual then keeps
    ``beta p + (1 - beta) v``, or ``p`` in its wider dtype), else to ``residual`` (``grad`` is
    then zeroed when ``zero_grad``). ``send_bits`` views the buffer that receives ``p`` as
    unsigned keys. Returns ``(slot_idx, slot_bits, counts, nonfinite)`` as ``select_capped`` does.
    """
    n = residual.size
    with_decay = param.size > 0
    with_momentum = momentum.size > 0
    nchunks = (n + chunk - 1) // chunk
    slot_idx = np.empty(nchunks * cap, np.int64)
    slot_bits = np.empty(nchunks * cap, send_bits.dtype)
    counts = np.zeros(nchunks, np.int64)
    bad = np.zeros(nchunks, np.int64)
    scan_from = min(key_min, inf_key)
    for c in prange(nchunks):
        lo = c * chunk
        hi = min(lo + chunk, n)
        base = c * cap
        kept = 0
        nonfinite = 0
        for start in range(lo, hi, RUN):
            stop = min(start + RUN, hi)
            # views from 0: Numba drops the negative-index checks and LLVM vectorizes (3x faster)
            grad_run, residual_run = grad[start:stop], residual[start:stop]
            param_run = param[start:stop] if with_decay else param
            momentum_run = momentum[start:stop] if with_momentum else momentum
            for j in range(stop - start):
                step_element(grad_run, param_run, momentum_run, residual_run, j, send_to_grad, zero_grad, scale,
                             weight_decay, momentum_factor, nesterov, beta, with_decay, with_momentum)
            kept, found = scan_run(send_bits[start:stop], start, mask, key_min, inf_key, scan_from, slot_idx,
                                   slot_bits, base, kept, cap)
            nonfinite += found
        counts[c] = kept
        bad[c] = nonfinite
    return slot_idx, slot_bits, counts, bad.sum()


@njit(nogil=True, cache=True)
def sample_keys(grad, param, momentum, residual, send, scale, weight_decay, momentum_factor, nesterov, mask,
                seed, nruns, run):
    """Keys that ``accumulate`` would give ``nruns`` runs of ``run`` elements at seeded starts
    (the same starts as ``_select_cpu.sample_keys``); reads them, writes nothing. ``send`` is
    the array (grad or residual) whose dtype the sent value takes."""
    n = residual.size
    with_decay = param.size > 0
    with_momentum = momentum.size > 0
    out = np.empty(nruns * run, np.uint64)
    starts = n - run + 1
    for r in range(nruns):
        start = np.int64(uniform01(seed, r) * starts)
        for j in range(run):
            i = start + j
            g = folded_gradient(grad, param, i, scale, weight_decay, with_decay)
            p = corrected(residual, momentum, i, g, momentum_factor, nesterov, with_momentum)[1]
            out[r * run + j] = np.uint64(stored_bits(send, rounded(send, p)) & mask)
    return out


@njit(parallel=True, nogil=True, cache=True)
def sum_squares(values, chunk):
    """Sum of squares in float64, one pass and no temporaries (local gradient clipping)."""
    n = values.size
    nchunks = (n + chunk - 1) // chunk
    partial = np.zeros(nchunks, np.float64)
    for c in prange(nchunks):
        total = 0.0
        for i in range(c * chunk, min(c * chunk + chunk, n)):
            x = np.float64(load(values, i))
            total += x * x
        partial[c] = total
    return partial.sum()
