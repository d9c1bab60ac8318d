"""Ok-Topk (Li & Hoefler, PPoPP 2022): a sparse allreduce that sends O(k) per rank whatever P is.

Each call, on every rank:

1. **Select.** On an estimation call (the first, a new shape, or every ``interval`` calls; see
   :mod:`.oktopk_state`) the exact local top-k, whose k-th magnitude becomes the local
   threshold; otherwise ``|g| > t_local`` in one pass, cut to its top k if it holds more.
2. **Place the regions** (estimation calls): a histogram of the selected indices, summed over
   the ranks by one allreduce, cuts the index space into P contiguous regions holding about the
   same number of selected entries; rank r owns region r.
3. **Split and reduce.** Each rank sends each region's part of its selection to that region's
   owner, destinations rotated (step i: to rank+i, from rank-i), and sums what it receives, in
   rank order, into its region's sum.
4. **Keep above the global threshold.** Each owner keeps its sum's entries with ``|s| >
   t_global``; an allreduce of the P counts tells every rank every owner's count K_r. On
   estimation calls, and when the kept total exceeds 5k/4, two allreduces of magnitude
   histograms first set ``t_global`` so that about k entries are kept overall.
5. **Balance and allgatherv.** The owners' kept entries, in region (= index) order, are
   re-split into P near-equal blocks by point-to-point sends, and a ring gathers the blocks:
   every rank ends with the same indices and values, bit for bit.

Pairs a rank sends: its selection outside its own region (about k(P-1)/P when the regions
balance), at most K(P-1)/P in the balance and K - K/P in the ring, K the kept total (about k):
the paper's 6k(P-1)/P numbers (index and value each), plus the counts and, on estimation calls,
the histograms. ``sent_indices`` are this rank's selected entries whose index is in the result:
the owner summed them all, so the ranks' sent values sum to the result exactly, and the rest
belongs in the error-feedback residual.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from sparsecoll import kernels
from sparsecoll.call import Call, CollectiveResult
from sparsecoll.collectives.dense import chunk_bounds, recursive_doubling_allreduce
from sparsecoll.collectives.quantized_ring import check_bits
from sparsecoll.collectives.oktopk_state import (
    GLOBAL_LOWER,
    GLOBAL_SLACK,
    LEVEL1_SHIFT,
    LEVEL2_SHIFT,
    LOCAL_LOWER,
    OkTopkState,
    crossing_bin,
    index_boundaries,
    index_bins,
    index_histogram,
    level1_histogram,
    level2_histogram,
    magnitude_keys,
    magnitudes,
    threshold_below_key,
)
from sparsecoll.collectives.sparse_common import (
    SparseResult,
    decode_sparse,
    encode_values,
    float_vector,
    payload_limit,
    resolve_k,
    ring_gather_blocks,
    sum_in_rank_order,
)
from sparsecoll.errors import FrameError, InvalidArgumentError
from sparsecoll.wire import Algorithm, Op, ReduceOp, Signature, dtype_code, sparse_buffers

if TYPE_CHECKING:
    from sparsecoll.group import Group

TAG_SPLIT = 1
TAG_BALANCE = 2
TAG_INDEX_HISTOGRAM = 1 << 10
TAG_LEVEL1 = 2 << 10
TAG_LEVEL2 = 3 << 10
TAG_COUNTS = 4 << 10
TAG_RECOUNT = 5 << 10
TAG_GATHER = 8 << 10

Pairs = tuple[np.ndarray, np.ndarray]


@dataclass
class OkTopkResult(SparseResult):
    """A :class:`SparseResult` with what this call's phases moved, in (index, value) pairs."""

    pairs_sent: dict[str, int] = field(default_factory=dict)
    """Pairs this rank sent in "split", "balance" and "gather"."""
    local_count: int = 0
    """Entries this rank selected."""
    kept_counts: list[int] = field(default_factory=list)
    """Each owner's kept entries (their sum is the result's length)."""
    boundaries: np.ndarray | None = None
    estimated: bool = False


async def oktopk(group: Group, grad: np.ndarray, *, k: int | None = None, density: float | None = None,
                 state: OkTopkState | None = None, interval: int | None = None,
                 quantize_bits: int | None = None, seed: int = 0, step: int = 0,
                 timeout: float | None = None) -> CollectiveResult:
    """Ok-Topk sparse allreduce of ``grad``; value is an :class:`OkTopkResult`.

    Without ``state`` every call estimates afresh (an exact local top-k and three small
    allreduces more); pass the same :class:`OkTopkState` on every call for one gradient to
    reuse the thresholds and regions between estimations. ``interval`` (default
    :data:`~.oktopk_state.DEFAULT_INTERVAL`) sets the state's calls between estimations.
    ``quantize_bits`` sends the split phase's values at b bits (stochastic rounding, a scale per
    256 values); the region sums travel exact, so the ranks' sent (decoded) values still sum
    to the result and nothing is rounded twice.
    """
    if quantize_bits is not None:
        check_bits(quantize_bits)
    flat = float_vector(grad)
    size = flat.size
    count = resolve_k(size, k, density)
    if state is not None and not isinstance(state, OkTopkState):
        raise InvalidArgumentError(f"state must be an OkTopkState, not {type(state).__name__}")
    memory = state if state is not None else OkTopkState()
    if interval is not None:
        memory.interval = interval
    memory.validate()
    shape = (size, count, group.size)
    estimate = memory.needs_estimate(shape)
    signature = Signature(Op.OKTOPK, Algorithm.TOPK if estimate else Algorithm.THRESHOLD,
                          dtype_code(flat.dtype), ReduceOp.SUM, -1, size, count,
                          int(memory.interval) | ((quantize_bits or 0) << 32))
    rank_seed = seed + 7919 * step + 104729 * group.rank

    async def body(call: Call) -> OkTopkResult:
        if estimate:
            memory.shape, memory.age = shape, 0
            memory.estimations += 1
        local = _select(flat, count, memory, estimate, rank_seed)
        if estimate:
            summed = index_histogram(local[0], size, index_bins(size, count))
            await _allreduce(call, summed, TAG_INDEX_HISTOGRAM)
            memory.boundaries = index_boundaries(summed, size, call.size)
        bounds = memory.boundaries
        pairs_sent = {"split": 0, "balance": 0, "gather": 0}
        local, region = await _split_and_reduce(call, local, bounds, count, flat.dtype, quantize_bits,
                                                rank_seed, pairs_sent)
        kept, counts = await _keep_above_global(call, region, count, memory, estimate)
        _check_counts(counts, bounds, call.rank)
        indices, values = await _balance_and_gather(call, kept, counts, size, flat.dtype, pairs_sent)
        memory.age += 1
        in_result = np.isin(local[0], indices, assume_unique=True)
        return OkTopkResult(indices, values, size, local[0][in_result], local[1][in_result],
                            pairs_sent=pairs_sent, local_count=int(local[0].size), kept_counts=counts,
                            boundaries=bounds.copy(), estimated=estimate)

    return await group.run(signature, body, timeout)


def _select(flat: np.ndarray, count: int, memory: OkTopkState, estimate: bool, seed: int) -> Pairs:
    """Step 1: this rank's nonzero selection (indices ascending); updates the local threshold."""
    if count == 0:
        memory.local_threshold = 0.0
        return np.empty(0, np.int64), np.empty(0, flat.dtype)
    if estimate:
        indices, values = kernels.topk(flat, count, method="fast", seed=seed)
    else:
        indices, values = kernels.select_threshold(flat, memory.local_threshold)
    nonzero = values != 0
    if not nonzero.all():
        indices, values = indices[nonzero], values[nonzero]
    if indices.size > count:
        indices, values = kernels.topk_sparse(indices, values, count)
    if estimate or indices.size >= count:
        # |g| > t excludes the k-th itself: on the next call about k-1 of this size come through
        memory.local_threshold = float(magnitudes(values).min()) if values.size else 0.0
    elif indices.size < 0.75 * count:
        memory.local_threshold /= LOCAL_LOWER
    return np.asarray(indices, np.int64), values


async def _allreduce(call: Call, counts: np.ndarray, tag: int) -> None:
    """Sum an int64 vector over the ranks in place (recursive doubling: log P messages)."""
    if call.size > 1:
        await recursive_doubling_allreduce(call, counts, np.add, tag)


async def _split_and_reduce(call: Call, local: Pairs, bounds: np.ndarray, count: int, dtype: np.dtype,
                            bits: int | None, seed: int, pairs_sent: dict[str, int]) -> tuple[Pairs, Pairs]:
    """Step 3: send each region's entries to its owner (rotated), sum this rank's region.

    Returns this rank's selection as it entered the sums (values decoded where they were sent
    quantized) and this rank's region sum."""
    size_, rank = call.size, call.rank
    indices, values = local
    cuts = np.searchsorted(indices, bounds)
    size = int(bounds[-1])
    low, high = int(bounds[rank]), int(bounds[rank + 1])
    limit = payload_limit(min(count, high - low), size, dtype, bits)
    entered = values.copy() if bits else values
    parts: list[Pairs | None] = [None] * size_
    parts[rank] = (indices[cuts[rank]:cuts[rank + 1]], values[cuts[rank]:cuts[rank + 1]])
    if size_ > 1:
        sources = [(rank - step) % size_ for step in range(1, size_)]
        posted = [call.post(source, TAG_SPLIT, limit=limit) for source in sources]
        try:
            for step in range(1, size_):
                owner = (rank + step) % size_
                part = slice(cuts[owner], cuts[owner + 1])
                wire_values, entered[part] = encode_values(values[part], bits, seed + 31 * owner)
                await call.send(owner, TAG_SPLIT, *sparse_buffers(indices[part], wire_values, size))
                pairs_sent["split"] += part.stop - part.start
        except BaseException:
            for receive in posted:
                await call.transport.mailbox.release(receive)
            raise
        for source, receive in zip(sources, posted):
            received = decode_sparse(await call.wait(receive), size, dtype, bits)
            _check_part(received[0], low, high, call.rank, source)
            parts[source] = received
        call.stats.rounds += 1
    return (indices, entered), sum_in_rank_order(parts, dtype)


def _check_counts(counts: list[int], bounds: np.ndarray, rank: int) -> None:
    """FrameError unless every owner's count fits its region (counts size the next receives)."""
    regions = np.diff(bounds)
    if any(value < 0 or value > int(length) for value, length in zip(counts, regions)):
        raise FrameError(f"owners' counts {counts} do not fit their regions {regions.tolist()}", rank=rank)


def _check_part(indices: np.ndarray, low: int, high: int, rank: int, source: int) -> None:
    """FrameError unless ``indices`` ascend strictly inside ``[low, high)``."""
    if indices.size and (int(indices[0]) < low or int(indices[-1]) >= high
                         or not bool(np.all(indices[1:] > indices[:-1]))):
        raise FrameError(f"rank {source} sent indices that are not ascending inside [{low}, {high})",
                         rank=rank, peer=source)


async def _keep_above_global(call: Call, region: Pairs, count: int, memory: OkTopkState,
                             estimate: bool) -> tuple[Pairs, list[int]]:
    """Step 4: this owner's entries above the global threshold, and every owner's count."""
    keys = magnitude_keys(region[1])
    if estimate:
        memory.global_threshold = await _global_threshold(call, keys, count)
    kept = keys > np.array(memory.global_threshold, np.float32).view(np.uint32)
    counts = await _counts(call, int(np.count_nonzero(kept)), TAG_COUNTS)
    total = sum(counts)
    if not estimate and total > GLOBAL_SLACK * count:
        memory.global_cuts += 1
        memory.global_threshold = await _global_threshold(call, np.where(kept, keys, 0), count)
        kept = keys > np.array(memory.global_threshold, np.float32).view(np.uint32)
        counts = await _counts(call, int(np.count_nonzero(kept)), TAG_RECOUNT)
        total = sum(counts)
    if total < 0.75 * count and memory.global_threshold > 0:
        memory.global_threshold = float(np.float32(memory.global_threshold) / np.float32(GLOBAL_LOWER))
    return (region[0][kept], region[1][kept]), counts


async def _global_threshold(call: Call, keys: np.ndarray, count: int) -> float:
    """The float32 t with about ``count`` of all owners' keys above it (two histogram allreduces)."""
    first = level1_histogram(keys)
    await _allreduce(call, first, TAG_LEVEL1)
    if int(first.sum()) <= count:
        return 0.0  # every nonzero entry fits
    bin1, above = crossing_bin(first, count)
    second = level2_histogram(keys, bin1)
    await _allreduce(call, second, TAG_LEVEL2)
    bin2, _ = crossing_bin(second, count - above)
    return threshold_below_key((bin1 << LEVEL1_SHIFT) | (bin2 << LEVEL2_SHIFT))


async def _counts(call: Call, mine: int, tag: int) -> list[int]:
    """Every owner's kept count, by one allreduce of a P-vector."""
    counts = np.zeros(call.size, np.int64)
    counts[call.rank] = mine
    await _allreduce(call, counts, tag)
    return [int(value) for value in counts]


async def _balance_and_gather(call: Call, kept: Pairs, counts: list[int], size: int, dtype: np.dtype,
                              pairs_sent: dict[str, int]) -> Pairs:
    """Step 5: re-split the kept entries into P near-equal blocks, then gather them by a ring."""
    ranks, rank = call.size, call.rank
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # owner r: [starts[r], starts[r+1])
    total = int(starts[-1])
    blocks = chunk_bounds(total, ranks)  # balanced block j: [blocks[j], blocks[j+1])

    def overlap(owner: int, block: int) -> tuple[int, int]:
        return max(int(starts[owner]), blocks[block]), min(int(starts[owner + 1]), blocks[block + 1])

    posted = {}
    for owner in range(ranks):
        low, high = overlap(owner, rank)
        if owner != rank and high > low:
            posted[owner] = (call.post(owner, TAG_BALANCE, limit=payload_limit(high - low, size, dtype, None)),
                             high - low)
    pieces: list[Pairs] = []
    try:
        for step in range(1, ranks):
            block = (rank + step) % ranks
            low, high = overlap(rank, block)
            if high > low:
                part = slice(low - int(starts[rank]), high - int(starts[rank]))
                await call.send(block, TAG_BALANCE, *sparse_buffers(kept[0][part], [kept[1][part]], size))
                pairs_sent["balance"] += high - low
    except BaseException:
        for receive, _ in posted.values():
            await call.transport.mailbox.release(receive)
        raise
    for owner in range(ranks):
        low, high = overlap(owner, rank)
        if high <= low:
            continue
        if owner == rank:
            part = slice(low - int(starts[rank]), high - int(starts[rank]))
            pieces.append((kept[0][part], kept[1][part]))
        else:
            receive, expected = posted[owner]
            pieces.append(_expect(decode_sparse(await call.wait(receive), size, dtype, None), expected,
                                  rank, owner))
    own = _concatenate(pieces, dtype)
    if ranks > 1:
        call.stats.rounds += 1
        largest = max(blocks[j + 1] - blocks[j] for j in range(ranks))
        gathered = await ring_gather_blocks(call, sparse_buffers(own[0], [own[1]], size),
                                            payload_limit(largest, size, dtype, None), TAG_GATHER)
        right = (rank + 1) % ranks  # the ring forwards every block but the right neighbour's
        pairs_sent["gather"] += total - (blocks[right + 1] - blocks[right])
        parts = [own if j == rank else _expect(decode_sparse(gathered[j], size, dtype, None),
                                               blocks[j + 1] - blocks[j], rank, j)
                 for j in range(ranks)]
        own = _concatenate(parts, dtype)
    indices = own[0]
    if indices.size > 1 and not bool(np.all(indices[1:] > indices[:-1])):
        raise FrameError("Ok-Topk's gathered indices are not strictly ascending", rank=rank)
    return indices, own[1]


def _expect(pairs: Pairs, expected: int, rank: int, source: int) -> Pairs:
    if pairs[0].size != expected:
        raise FrameError(f"rank {source} sent {pairs[0].size} pairs where {expected} were due",
                         rank=rank, peer=source)
    return pairs


def _concatenate(parts: list[Pairs], dtype: np.dtype) -> Pairs:
    if not parts:
        return np.empty(0, np.int64), np.empty(0, dtype)
    return (np.concatenate([np.asarray(part[0], np.int64) for part in parts]),
            np.concatenate([np.asarray(part[1], dtype) for part in parts]))
