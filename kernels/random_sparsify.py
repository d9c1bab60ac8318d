"""Unbiased random sparsification (Wangni et al. 2018, "Gradient Sparsification for
Communication-Efficient Distributed Optimization").

Coordinate i is kept with probability ``p_i = min(1, lam * |g_i|)`` and sent as ``g_i / p_i``, so
the sparse vector is an unbiased estimate of g. ``lam`` follows the paper's greedy rule for a
target density: start from ``lam = k / sum|g|`` with ``k = density * d``; coordinates whose
``p_i`` reaches 1 are kept for sure, and ``lam`` is recomputed over the rest until no more
coordinates saturate. The coin flips are a counter-based hash of ``(seed, i)``, so ranks that
share a seed flip the same coins, on CPU and GPU alike.

The paper's other form fixes the variance instead of the density (its eq. (5), solved in closed
form, Algorithm 2): the fewest expected coordinates ``sum p_i`` such that
``E ||Q(g)||^2 = sum g_i^2 / p_i <= (1 + eps) ||g||^2``. With ``p_i = min(1, lam |g_i|)`` and S
the saturated set, the budget is met with equality at
``lam = sum_{i not in S} |g_i| / (eps ||g||^2 + sum_{i not in S} g_i^2)``, and ``lam`` is
recomputed as S grows until it stops (``variance_budget=eps``; each round only raises ``lam``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from sparsecoll.errors import InvalidArgumentError

from ._dispatch import CUDA, as_device_vector, as_host_vector, backend_of, float_dtype, wrap_like
from ._scalar import uniform01

CHUNK = 1 << 16
MAX_ROUNDS = 32  # each round saturates at least one more coordinate; real gradients need few


@njit(nogil=True, cache=True)
def keep_probability(x, lam):
    return min(1.0, lam * abs(np.float64(x)))


@njit(nogil=True, cache=True)
def is_kept(x, i, lam, seed):
    """Whether coordinate ``i`` survives (``keep`` predicate of the CUDA compaction, too)."""
    return uniform01(seed, i) < keep_probability(x[i], lam)


@njit(parallel=True, nogil=True, cache=True)
def scale_sums(x, lam):
    """One pass for both ways of choosing ``lam``: (count with lam|x| >= 1, sum of |x| and of x^2
    over the others, x^2 over all, count of NaN/inf)."""
    n = x.size
    nchunks = (n + CHUNK - 1) // CHUNK
    saturated = np.zeros(nchunks, np.int64)
    rest = np.zeros(nchunks, np.float64)
    rest_squares = np.zeros(nchunks, np.float64)
    squares = np.zeros(nchunks, np.float64)
    bad = np.zeros(nchunks, np.int64)
    for c in prange(nchunks):
        view = x[c * CHUNK : min((c + 1) * CHUNK, n)]
        sat = 0
        total = 0.0
        total_squares = 0.0
        every_square = 0.0
        nonfinite = 0
        for j in range(view.size):
            a = abs(np.float64(view[j]))
            if not a < np.inf:
                nonfinite += 1
                continue
            every_square += a * a
            if lam * a >= 1.0:
                sat += 1
            else:
                total += a
                total_squares += a * a
        saturated[c] = sat
        rest[c] = total
        rest_squares[c] = total_squares
        squares[c] = every_square
        bad[c] = nonfinite
    return saturated.sum(), rest.sum(), rest_squares.sum(), squares.sum(), bad.sum()


def budget_scale(sums: Any, variance_budget: float) -> float:
    """The paper's closed-form ``lam`` for ``E||Q(g)||^2 <= (1 + eps)||g||^2``; ``sums(lam)`` is a
    scale_sums pass."""
    _, rest, rest_squares, squares, bad = sums(0.0)
    if bad:
        raise InvalidArgumentError(f"array holds {int(bad)} NaN or inf value(s)")
    if rest == 0.0:
        return 0.0
    lam = rest / (variance_budget * squares + rest_squares)
    for _ in range(MAX_ROUNDS + 1):
        _, rest, rest_squares, _, _ = sums(lam)
        if rest == 0.0:
            return lam
        new_lam = rest / (variance_budget * squares + rest_squares)
        if new_lam <= lam * (1.0 + 1e-12):
            return lam
        lam = new_lam
    return lam


def check_budget(density: float | None, variance_budget: float | None) -> None:
    """InvalidArgumentError unless exactly one of a density in (0, 1] and a budget eps > 0 is given."""
    if (density is None) == (variance_budget is None):
        raise InvalidArgumentError("give exactly one of density and variance_budget")
    if density is not None and not 0.0 < density <= 1.0:
        raise InvalidArgumentError(f"density must be in (0, 1], not {density}")
    if variance_budget is not None and not (variance_budget > 0 and np.isfinite(variance_budget)):
        raise InvalidArgumentError(f"variance_budget must be a finite number > 0, not {variance_budget}")


def greedy_scale(sums: Any, size: int, density: float) -> float:
    """The paper's greedy ``lam`` for a target density; ``sums(lam)`` is a scale_sums pass."""
    target = density * size
    saturated, rest, _, _, bad = sums(0.0)
    if bad:
        raise InvalidArgumentError(f"array holds {int(bad)} NaN or inf value(s)")
    if rest == 0.0:
        return 0.0
    lam = target / rest
    for _ in range(MAX_ROUNDS):
        saturated, rest, _, _, _ = sums(lam)
        if rest == 0.0 or saturated >= target:
            return lam
        new_lam = (target - saturated) / rest
        if new_lam <= lam * (1.0 + 1e-12):
            return lam
        lam = new_lam
    return lam


@njit(parallel=True, nogil=True, cache=True)
def _count_kept(x, lam, seed):
    n = x.size
    nchunks = (n + CHUNK - 1) // CHUNK
    counts = np.zeros(nchunks, np.int64)
    for c in prange(nchunks):
        kept = 0
        for i in range(c * CHUNK, min((c + 1) * CHUNK, n)):
            kept += is_kept(x, i, lam, seed)
        counts[c] = kept
    return counts


@njit(parallel=True, nogil=True, cache=True)
def _write_kept(x, lam, seed, counts, out_idx, out_val):
    n = x.size
    offsets = np.zeros(counts.size + 1, np.int64)
    for c in range(counts.size):
        offsets[c + 1] = offsets[c] + counts[c]
    for c in prange(counts.size):
        pos = offsets[c]
        for i in range(c * CHUNK, min((c + 1) * CHUNK, n)):
            if is_kept(x, i, lam, seed):
                out_idx[pos] = i
                out_val[pos] = x[i] / keep_probability(x[i], lam)
                pos += 1


def random_sparsify(array: Any, density: float | None = None, *, seed: int = 0,
                    variance_budget: float | None = None) -> tuple[Any, Any]:
    """Keeps about ``density * size`` coordinates at random, scaled so the result is unbiased;
    or, with ``variance_budget`` (eps) instead, the fewest whose variance stays within
    ``E||Q(g)||^2 <= (1 + eps) ||g||^2``.

    Returns (int64 indices ascending, scaled values in the input dtype).
    """
    check_budget(density, variance_budget)
    if backend_of(array) == CUDA:
        from . import _random_sparsify_cuda

        device = as_device_vector(array)
        float_dtype(device.dtype)
        idx, val = _random_sparsify_cuda.random_sparsify(device, density, seed, variance_budget)
        return wrap_like(array, idx), wrap_like(array, val)
    host = as_host_vector(array)
    dtype = float_dtype(host.dtype)
    x = host.astype(np.float32) if np.dtype(dtype).itemsize == 2 else host
    if variance_budget is not None:
        lam = budget_scale(lambda scale: scale_sums(x, scale), variance_budget)
    else:
        lam = greedy_scale(lambda scale: scale_sums(x, scale), x.size, density)
    counts = _count_kept(x, lam, np.uint64(seed))
    total = int(counts.sum())
    out_idx = np.empty(total, np.int64)
    out_val = np.empty(total, x.dtype)
    _write_kept(x, lam, np.uint64(seed), counts, out_idx, out_val)
    return out_idx, out_val.astype(dtype, copy=False)
