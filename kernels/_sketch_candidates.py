"""The CPU candidate pass of heavy-hitter recovery: every coordinate whose ``|estimate|`` reaches
a threshold, with its estimate, without a d-sized estimate array.

1. Hot map: one bit per counter, set where ``|counter| >= threshold`` (:mod:`._sketch_scalar`).
2. Survivors: a block of coordinates (up to 64, consecutive columns in every row) at a time,
   each row's hot bits of the block are one window of its hot-map row; a count over the rows,
   done on the 64 bits at once, keeps the coordinates with enough hot rows for their median
   to reach the threshold. One word of survivor bits a block.
3. Gather: a row at a time, every survivor's signed counter. The row (2 MB at 500K columns)
   stays in L2 while the survivors go by; a survivor at a time, its rows' counters were L3 or
   memory misses, which the other ranks of a host make slower still.
4. Medians: a survivor whose median reaches the threshold is a candidate.
Survivors and candidates come out in index order.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._scalar import median_of_first, sketch_block_shift
from ._sketch_scalar import allowed_cold_rows, block_hot_bits, block_is_negative, block_start, hot_word, hot_words

CHUNK_BLOCKS = 256  # blocks per parallel work item of the survivor and gather passes
MEDIAN_BATCH = 1 << 14  # survivors per parallel work item of the median pass
_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


@njit(nogil=True, cache=True)
def _popcount(bits):
    bits = bits - ((bits >> np.uint64(1)) & _M1)
    bits = (bits & _M2) + ((bits >> np.uint64(2)) & _M2)
    bits = (bits + (bits >> np.uint64(4))) & _M4
    return np.int64((bits * _H01) >> np.uint64(56))


@njit(parallel=True, nogil=True, cache=True)
def _hot_map_cpu(table, threshold, hot):
    words = hot.shape[1]
    for w in prange(table.shape[0] * words):
        hot[w // words, w % words] = hot_word(table, w // words, w % words, threshold)


@njit(parallel=True, nogil=True, cache=True)
def _survivors_cpu(hashes, hot, size, columns, survivors, counts):
    rows = hashes.shape[0]
    shift = sketch_block_shift(columns)
    width = 1 << shift
    needed = rows - allowed_cold_rows(rows)
    blocks = survivors.size
    for c in prange(counts.size):
        at_least = np.empty(needed + 1, np.uint64)  # bit t of at_least[m]: >= m hot rows so far
        total = 0
        for block in range(c * CHUNK_BLOCKS, min((c + 1) * CHUNK_BLOCKS, blocks)):
            start = block * width
            count = min(width, size - start)
            at_least[0] = ~np.uint64(0)
            for m in range(1, needed + 1):
                at_least[m] = 0
            for j in range(rows):
                first = np.int64(block_start(hashes[j, 0], hashes[j, 1], block, columns))
                bits = block_hot_bits(hot[j], first, count, columns)
                for m in range(min(j + 1, needed), 0, -1):
                    at_least[m] |= at_least[m - 1] & bits
            survivors[block] = at_least[needed]
            total += _popcount(at_least[needed])
        counts[c] = total


@njit(parallel=True, nogil=True, cache=True)
def _gather_rows_cpu(table, hashes, survivors, offsets, indices, values):
    rows, columns = table.shape
    shift = sketch_block_shift(columns)
    width = 1 << shift
    for j in range(rows):
        for c in prange(offsets.size - 1):
            slot = offsets[c]
            for block in range(c * CHUNK_BLOCKS, min((c + 1) * CHUNK_BLOCKS, survivors.size)):
                bits = survivors[block]
                if bits == 0:
                    continue
                first = np.int64(block_start(hashes[j, 0], hashes[j, 1], block, columns))
                negative = block_is_negative(hashes[j, 2], hashes[j, 3], block)
                while bits:  # a survivor at a time, lowest bit first (a loop over 64 bits was 3x slower)
                    t = _popcount((bits & (~bits + np.uint64(1))) - np.uint64(1))
                    bits &= bits - np.uint64(1)
                    column = first + t
                    if column >= columns:
                        column -= columns
                    value = np.float64(table[j, column])
                    values[slot, j] = -value if negative else value
                    indices[slot] = block * width + t
                    slot += 1


@njit(parallel=True, nogil=True, cache=True)
def _medians_cpu(values, threshold, estimates, passed):
    total = values.shape[0]
    for c in prange((total + MEDIAN_BATCH - 1) // MEDIAN_BATCH):
        for s in range(c * MEDIAN_BATCH, min((c + 1) * MEDIAN_BATCH, total)):
            estimates[s] = median_of_first(values[s], values.shape[1])  # sorts the scratch row in place
            passed[s] = abs(estimates[s]) >= threshold


def candidates_host(table: np.ndarray, hashes: np.ndarray, size: int,
                    threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(indices, estimates) of every coordinate of ``[0, size)`` with ``|estimate| >= threshold``."""
    rows, columns = table.shape
    hot = np.empty((rows, hot_words(columns)), np.uint32)
    _hot_map_cpu(table, threshold, hot)
    survivors = np.empty(-(-size // (1 << int(sketch_block_shift(columns)))), np.uint64)
    counts = np.zeros(-(-survivors.size // CHUNK_BLOCKS), np.int64)
    _survivors_cpu(hashes, hot, size, columns, survivors, counts)
    offsets = np.zeros(counts.size + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    indices = np.empty(offsets[-1], np.int64)
    values = np.empty((offsets[-1], rows), np.float64)
    _gather_rows_cpu(table, hashes, survivors, offsets, indices, values)
    estimates = np.empty(offsets[-1], np.float64)
    passed = np.empty(offsets[-1], np.bool_)
    _medians_cpu(values, threshold, estimates, passed)
    return indices[passed], estimates[passed]
