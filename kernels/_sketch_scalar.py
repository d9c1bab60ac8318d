"""Per-coordinate sketch logic shared by the CPU (``@njit``) and CUDA (``@cuda.jit``) kernels.

The CPU kernels call these directly; the CUDA twin recompiles the ones that index arrays as
device functions (``_cuda_compact.device_function``), so both find the same candidates with
the same arithmetic.

Heavy-hitter recovery filters coordinates through a *hot map*: one bit per counter, set when
``|counter| >= threshold``. A median of ``rows`` values can reach ``threshold`` in magnitude only
if at least ``(rows + 1) // 2`` of them do (for even ``rows``, the upper middle value must), so a
coordinate whose buckets are cold in more than ``rows - (rows + 1) // 2`` rows is dropped after
reading a few bits; the map is rows x columns / 8 bytes (312 KB for 5 x 500K), small enough to
stay in cache where the table (10 MB) does not.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._scalar import median_of_first

_S32 = np.uint64(32)
_S63 = np.uint64(63)
HOT_WORD_BITS = 32  # uint32 words: CUDA builds one word per thread, without atomics
_WORD_SHIFT = np.uint64(5)
_WORD_MASK = np.uint64(31)
_ONE = np.uint32(1)


def hot_words(columns: int) -> int:
    """uint32 words of one hot-map row."""
    return -(-columns // HOT_WORD_BITS)


@njit(nogil=True, cache=True)
def bucket_unsigned(a, b, i, columns):
    """``sketch_bucket`` as an unsigned index (an index Numba knows is >= 0 skips the wraparound)."""
    return (((np.uint64(a) * np.uint64(i) + np.uint64(b)) >> _S32) * np.uint64(columns)) >> _S32


@njit(nogil=True, cache=True)
def sign_is_negative(a, b, i):
    """``sketch_sign(a, b, i) < 0`` as a flag, so a value is negated instead of multiplied."""
    return ((np.uint64(a) * np.uint64(i) + np.uint64(b)) >> _S63) != 0


@njit(nogil=True, cache=True)
def hot_word(table, j, word, threshold):
    """Bits of counters ``32 word .. 32 word + 31`` of row ``j`` whose ``|value| >= threshold``."""
    bits = np.uint32(0)
    start = word * HOT_WORD_BITS
    stop = min(start + HOT_WORD_BITS, table.shape[1])
    for column in range(start, stop):
        if abs(np.float64(table[j, column])) >= threshold:
            bits |= _ONE << np.uint32(column - start)
    return bits


@njit(nogil=True, cache=True)
def cold_rows_exceed(hot, hashes, i, columns, allowed):
    """True when more than ``allowed`` rows put coordinate ``i`` in a cold bucket (it cannot pass)."""
    cold = 0
    for j in range(hashes.shape[0]):
        column = bucket_unsigned(hashes[j, 0], hashes[j, 1], i, columns)
        if (hot[j, column >> _WORD_SHIFT] >> np.uint32(column & _WORD_MASK)) & _ONE == 0:
            cold += 1
            if cold > allowed:
                return True
    return False


@njit(nogil=True, cache=True)
def row_estimate(table, hashes, i, buf):
    """Median over rows of the signed counters of coordinate ``i``; ``buf`` holds >= rows floats."""
    rows = table.shape[0]
    for j in range(rows):
        value = np.float64(table[j, bucket_unsigned(hashes[j, 0], hashes[j, 1], i, table.shape[1])])
        buf[j] = -value if sign_is_negative(hashes[j, 2], hashes[j, 3], i) else value
    return median_of_first(buf, rows)


@njit(nogil=True, cache=True)
def allowed_cold_rows(rows):
    """Rows that may be cold for a coordinate whose median can still reach the threshold."""
    return rows - (rows + 1) // 2
