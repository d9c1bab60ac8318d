"""Per-coordinate sketch logic shared by the CPU (``@njit``) and CUDA (``@cuda.jit``) kernels.

The CPU kernels call these directly; the CUDA twin recompiles the ones that index arrays as
device functions (``_cuda_compact.device_function``), so both find the same candidates with
the same arithmetic.

Heavy-hitter recovery filters coordinates through a *hot map*: one bit per counter, set when
``|counter| >= threshold``. A median of ``rows`` values can reach ``threshold`` in magnitude only
if at least ``(rows + 1) // 2`` of them do (for even ``rows``, the upper middle value must), so a
coordinate whose buckets are cold in more than ``rows - (rows + 1) // 2`` rows is dropped after
reading a few bits; the map is rows x columns / 8 bytes (312 KB for 5 x 500K), small enough to
stay in cache where the table (10 MB) does not. The CPU pass reads a block's bits in a row as
one window (``block_hot_bits``); the GPU tests a coordinate at a time (``cold_rows_exceed``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._scalar import median_of_first, sketch_block_shift

_S32 = np.uint64(32)
_S63 = np.uint64(63)
HOT_WORD_BITS = 32  # uint32 words: CUDA builds one word per thread, without atomics
_WORD_SHIFT = np.uint64(5)
_WORD_MASK = np.uint64(31)
_ONE = np.uint32(1)
_ONE64 = np.uint64(1)


def hot_words(columns: int) -> int:
    """uint32 words of one hot-map row."""
    return -(-columns // HOT_WORD_BITS)


@njit(nogil=True, cache=True)
def block_start(a, b, block, columns):
    """First column of a block of coordinates in one row (``sketch_bucket`` of its offset 0)."""
    return (((np.uint64(a) * np.uint64(block) + np.uint64(b)) >> _S32) * np.uint64(columns)) >> _S32


@njit(nogil=True, cache=True)
def block_is_negative(a, b, block):
    """``sketch_sign < 0`` for every coordinate of a block, as a flag (negate, not multiply)."""
    return ((np.uint64(a) * np.uint64(block) + np.uint64(b)) >> _S63) != 0


@njit(nogil=True, cache=True)
def bucket_unsigned(a, b, i, columns, shift):
    """``sketch_bucket`` as an unsigned index, given ``sketch_block_shift(columns)``."""
    column = block_start(a, b, np.uint64(i) >> shift, columns) + (np.uint64(i) & ((np.uint64(1) << shift) - _ONE64))
    return column - np.uint64(columns) if column >= np.uint64(columns) else column


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
    shift = sketch_block_shift(columns)
    for j in range(hashes.shape[0]):
        column = bucket_unsigned(hashes[j, 0], hashes[j, 1], i, columns, shift)
        if (hot[j, column >> _WORD_SHIFT] >> np.uint32(column & _WORD_MASK)) & _ONE == 0:
            cold += 1
            if cold > allowed:
                return True
    return False


@njit(nogil=True, cache=True)
def signed_counters(table, hashes, i, out):
    """``out[j]``: row j's counter of coordinate ``i`` times its sign, as float64."""
    rows, columns = table.shape
    shift = sketch_block_shift(columns)
    block = np.uint64(i) >> shift
    for j in range(rows):
        value = np.float64(table[j, bucket_unsigned(hashes[j, 0], hashes[j, 1], i, columns, shift)])
        out[j] = -value if block_is_negative(hashes[j, 2], hashes[j, 3], block) else value


@njit(nogil=True, cache=True)
def row_estimate(table, hashes, i, buf):
    """Median over rows of the signed counters of coordinate ``i``; ``buf`` holds >= rows floats."""
    signed_counters(table, hashes, i, buf)
    return median_of_first(buf, table.shape[0])


@njit(nogil=True, cache=True)
def allowed_cold_rows(rows):
    """Rows that may be cold for a coordinate whose median can still reach the threshold."""
    return rows - (rows + 1) // 2


@njit(nogil=True, cache=True)
def hot_bits(hot_row, first, count):
    """Bits ``first .. first + count - 1`` (count <= 64, no wrap) of a hot-map row as a uint64,
    bit t for column ``first + t``. Indices are int64: Numba turns uint64 mixed with int into float."""
    word = first >> 5
    offset = first & 31
    bits = np.uint64(hot_row[word])
    if word + 1 < hot_row.size:
        bits |= np.uint64(hot_row[word + 1]) << _S32
    bits >>= np.uint64(offset)
    if offset > 0 and word + 2 < hot_row.size:
        bits |= np.uint64(hot_row[word + 2]) << np.uint64(64 - offset)
    if count < 64:
        bits &= (_ONE64 << np.uint64(count)) - _ONE64
    return bits


@njit(nogil=True, cache=True)
def block_hot_bits(hot_row, first, count, columns):
    """Hot bits of ``count`` (<= 64) consecutive columns from ``first``, wrapping around the row."""
    head = min(count, columns - first)
    bits = hot_bits(hot_row, first, head)
    if head < count:
        bits |= hot_bits(hot_row, 0, count - head) << np.uint64(head)
    return bits
