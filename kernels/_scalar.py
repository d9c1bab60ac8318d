"""Scalar logic shared by the CPU (``@njit``) and CUDA (``@cuda.jit``) kernels.

These are plain ``@njit`` functions: CPU kernels call them directly and CUDA kernels call them
too (Numba compiles a ``@jit`` function for the calling target), so the hash, the random numbers
and the rounding rules are written once and agree bit for bit between CPU and GPU.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_A = np.uint64(0xBF58476D1CE4E5B9)
_MIX_B = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_S32 = np.uint64(32)
_S63 = np.uint64(63)
_INV_2_53 = 1.0 / 9007199254740992.0


@njit(nogil=True, cache=True)
def splitmix64(x):
    """A 64-bit bijective mix (splitmix64 finalizer); the root of every seeded stream."""
    z = np.uint64(x) + _GOLDEN
    z = (z ^ (z >> _S30)) * _MIX_A
    z = (z ^ (z >> _S27)) * _MIX_B
    return z ^ (z >> _S31)


@njit(nogil=True, cache=True)
def uniform01(seed, i):
    """Counter-based uniform in [0, 1) for element ``i`` of stream ``seed``: no state, any order."""
    h = splitmix64(np.uint64(seed) ^ splitmix64(np.uint64(i)))
    return np.float64(h >> _S11) * _INV_2_53


@njit(nogil=True, cache=True)
def sketch_block_shift(columns):
    """log2 of a sketch block's width: 64 coordinates, or the largest power of two <= columns.

    A block of consecutive coordinates lands on consecutive columns of a row (see
    ``sketch_bucket``); a block never wider than the row keeps its coordinates apart.
    """
    shift = 6
    while shift > 0 and (1 << shift) > columns:
        shift -= 1
    return np.uint64(shift)


@njit(nogil=True, cache=True)
def sketch_bucket(a, b, i, columns):
    """Column of coordinate ``i`` in one sketch row: its block's multiply-add-shift hash (fast
    range to a start column) plus its offset in the block, wrapping around the row.

    Two coordinates of different blocks share a column with probability 1/columns, as with a
    hash per coordinate, and two of one block never do: the count sketch's error bound holds,
    while an insert adds a block as one contiguous run and recovery tests 64 coordinates a word.
    """
    shift = sketch_block_shift(columns)
    block = np.uint64(i) >> shift
    start = (((np.uint64(a) * block + np.uint64(b)) >> _S32) * np.uint64(columns)) >> _S32
    column = start + (np.uint64(i) & ((np.uint64(1) << shift) - np.uint64(1)))
    if column >= np.uint64(columns):
        column -= np.uint64(columns)
    return np.int64(column)


@njit(nogil=True, cache=True)
def sketch_sign(a, b, i, columns):
    """Sign (+1.0 or -1.0) of coordinate ``i`` in one sketch row: top bit of a second hash of its
    block (coordinates of one block never collide, so one sign a block keeps signs pairwise
    independent across the coordinates that do)."""
    h = (np.uint64(a) * (np.uint64(i) >> sketch_block_shift(columns)) + np.uint64(b)) >> _S63
    return 1.0 - 2.0 * np.float64(h)


@njit(nogil=True, cache=True)
def stochastic_code(x, scale, steps, u):
    """Code in [0, steps] of ``x`` on the grid -scale..scale with ``steps`` intervals.

    Rounds up with probability equal to the distance from the lower grid point, so the
    dequantized value is unbiased; ``u`` is a uniform draw in [0, 1).
    """
    if scale <= 0.0:
        return steps // 2
    pos = (np.float64(x) / scale + 1.0) * 0.5 * steps
    if pos <= 0.0:
        return 0
    if pos >= steps:
        return steps
    low = np.int64(pos)
    if u < pos - low:
        low += 1
    return low


@njit(nogil=True, cache=True)
def code_value(code, scale, steps):
    """The value a code stands for on the grid -scale..scale with ``steps`` intervals."""
    return scale * (2.0 * np.float64(code) / steps - 1.0)


@njit(nogil=True, cache=True)
def median_of_first(buf, n):
    """Median of ``buf[:n]``; sorts that prefix in place (n is a sketch's row count, small)."""
    for i in range(1, n):
        v = buf[i]
        j = i - 1
        while j >= 0 and buf[j] > v:
            buf[j + 1] = buf[j]
            j -= 1
        buf[j + 1] = v
    if n % 2 == 1:
        return buf[n // 2]
    return 0.5 * (buf[n // 2 - 1] + buf[n // 2])
