"""Two-level gradient reduction for hosts with several ranks (Horovod's and BytePS's
hierarchical allreduce, here also for the sparse algorithms).

With H hosts and S shards (S = the largest host's rank count; see :mod:`sparsecoll.topology`):

1. Reduce-scatter inside the host: every rank sends shard j of its gradient to the shard's
   owner on its host (local rank ``j mod L_h``), which sums the host's copies in local-rank
   order. For "dense" and "cltk" the whole shard goes: (L_h - 1)/L_h of the gradient a rank.
   For "allgather" and "gTop-k" each rank first selects its own top-k of the whole gradient
   and sends only the pairs in shard j: (L_h - 1)/L_h of k pairs a rank, so the host's links
   carry what the sparse algorithm carries, not the dense gradient (a dense reduce-scatter of
   d = 25M floats took seconds over loopback TCP, where the sparse algorithm's whole traffic
   takes milliseconds at 1 Gbit/s).
2. Between hosts, on each shard: the owners of shard j on every host (inter-host group j) run
   the chosen algorithm on their host sums with k_j of the k entries (k split over the
   shards as the shards split d). The S inter-host collectives run at once, one per local
   rank, so every rank's link to the network works; a rank owning several shards (a host
   with fewer ranks than S) runs its collectives concurrently. For "allgather" and "gtopk" the
   owner's own top k_j is taken among the at most k nonzero pairs of its host sum (the set a
   read of the dense shard gives), not by reading the d/S-value shard again.
3. Allgather inside the host: each owner sends its shard's result, and for the sparse
   algorithms which of the result's entries hold its host's sum, to the host's other ranks.

The slow links then carry the algorithm's traffic for H ranks on 1/S of the gradient, instead
of for H·L ranks on all of it. Every rank ends with the same bits: each shard's result is the
one its inter-host collective agreed on, copied inside the host.

Error feedback stays exact: where the host sum of an index entered the result (gTop-k: it
survived every merge; allgather: the owner selected it; CLT-k: the leader chose it), every
rank of the host that put a value into that sum (every rank, or for allgather and gTop-k
those that selected the index) reports its own value there as sent, so what all ranks sent
sums to the result, and everything else stays in each rank's residual.

Supported: "dense", "allgather", "gtopk", "cltk" (CLT-k's leader host rotates with the step
and differs between shards, ``step + shard``). Quantized values and lazy aggregation stay flat.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import numpy as np

from sparsecoll import kernels
from sparsecoll.call import Call, CollectiveResult, CommStats
from sparsecoll.collectives.cltk import cltk
from sparsecoll.collectives.cost_bytes import TWO_LEVEL_ALGORITHMS
from sparsecoll.collectives.dense import allreduce, chunk_bounds
from sparsecoll.collectives.gtopk import gtopk
from sparsecoll.collectives.sparse_allgather import sparse_allgather
from sparsecoll.collectives.sparse_common import (
    SparseResult,
    decode_sparse,
    float_vector,
    payload_limit,
    preselected,
    resolve_k,
    select,
    sum_in_rank_order,
)
from sparsecoll.errors import FrameError, InvalidArgumentError
from sparsecoll.wire import (
    Algorithm,
    Op,
    ReduceOp,
    Signature,
    dtype_code,
    sparse_buffers,
    sparse_payload_size,
    split_sparse,
)

if TYPE_CHECKING:
    from sparsecoll.group import Group
    from sparsecoll.topology import HostTable

HIERARCHICAL_ALGORITHMS = TWO_LEVEL_ALGORITHMS  # one tuple: what runs two-level is what the cost model prices so
SPARSE_SCATTER = ("allgather", "gtopk")
"""Algorithms whose step 1 sums the ranks' top-k selections instead of whole shards."""
MODES = (True, False, "auto")
_SCATTER = zlib.crc32(b"hierarchical reduce-scatter")
_GATHER = zlib.crc32(b"hierarchical allgather")
_SPARSE_SCATTER = zlib.crc32(b"hierarchical sparse reduce-scatter")


def check_mode(hierarchical: Any) -> None:
    """InvalidArgumentError unless ``hierarchical`` is True, False or "auto"."""
    if not any(hierarchical is mode if isinstance(mode, bool) else hierarchical == mode for mode in MODES):
        raise InvalidArgumentError(f"hierarchical must be True, False or 'auto', not {hierarchical!r}")


async def use_hierarchical(group: Group, algorithm: str, hierarchical: bool | str, *,
                           quantize_bits: int | None, lazy: Any, timeout: float | None) -> bool:
    """Whether this call runs two-level: the same answer on every rank.

    True asks for it (an algorithm or option it cannot do is refused); "auto" takes it where
    it can and there is more than one host and a host with more than one rank. With one host,
    or one rank a host, both run the flat algorithm (the two levels would be one).
    """
    check_mode(hierarchical)
    if hierarchical is False:
        return False
    supported = algorithm in HIERARCHICAL_ALGORITHMS and quantize_bits is None and lazy is None
    if hierarchical is True and not supported:
        raise InvalidArgumentError(
            f"hierarchical=True runs {list(HIERARCHICAL_ALGORITHMS)} without quantize_bits or lazy, "
            f"not {algorithm!r}" + (" with quantize_bits" if quantize_bits is not None else "")
            + (" with lazy" if lazy is not None else ""), rank=group.rank)
    if not supported:
        return False
    topology = await group.topology.discover(timeout)
    return topology.table.hierarchical_helps()


async def _all(awaitables: list[Awaitable]) -> list:
    """Await all at once; when one fails, cancel the rest (the group is poisoned anyway)."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()


def _owner(local_size: int, shard: int) -> int:
    return shard % local_size


async def host_reduce_scatter(local: Group, flat: np.ndarray, bounds: list[int], shards: int,
                              timeout: float | None) -> tuple[dict[int, np.ndarray], CommStats]:
    """Step 1: {owned shard: the host's sum of it, added in local-rank order}."""
    signature = Signature(Op.CUSTOM, Algorithm.SCATTER_ALLGATHER, dtype_code(flat.dtype), ReduceOp.SUM, -1,
                          flat.size, shards, _SCATTER)

    async def body(call: Call) -> dict[int, np.ndarray]:
        me, size = call.rank, call.size
        owned = [shard for shard in range(shards) if _owner(size, shard) == me]
        parts: dict[int, list[np.ndarray]] = {}
        waits = []
        for shard in owned:
            piece = flat[bounds[shard]:bounds[shard + 1]]
            parts[shard] = [piece if peer == me else np.empty_like(piece) for peer in range(size)]
            waits += [call.wait(call.post(peer, shard, parts[shard][peer])) for peer in range(size) if peer != me]
        sends = [call.send(_owner(size, shard), shard, flat[bounds[shard]:bounds[shard + 1]])
                 for shard in range(shards) if _owner(size, shard) != me]
        await _all(sends + waits)
        call.stats.rounds += 1
        sums = {}
        for shard in owned:
            total = parts[shard][0].copy()
            for part in parts[shard][1:]:
                np.add(total, part, out=total)
            sums[shard] = total
        return sums

    return await local.run(signature, body, timeout)


async def host_sparse_reduce_scatter(local: Group, flat: np.ndarray, bounds: list[int], shards: int, count: int,
                                     method: str, seed: int,
                                     timeout: float | None
                                     ) -> tuple[tuple[dict[int, np.ndarray], tuple, dict[int, tuple]], CommStats]:
    """Step 1 of allgather and gTop-k: ({owned shard: the host's sum of its ranks' top-k there,
    as a dense shard}, this rank's own (indices, values), {owned shard: that sum's nonzero
    entries, (indices, values)}).

    Each rank selects its top ``count`` of the whole gradient and sends the part in shard j to
    shard j's owner, which adds the parts in local-rank order: (L-1)/L of k pairs a rank
    inside the host, where a dense reduce-scatter would move (L-1)/L of d values.
    """
    size = flat.size
    signature = Signature(Op.CUSTOM, Algorithm.TOPK, dtype_code(flat.dtype), ReduceOp.SUM, shards,
                          size, count, _SPARSE_SCATTER)

    async def body(call: Call) -> tuple[dict[int, np.ndarray], tuple, dict[int, tuple]]:
        me, ranks = call.rank, call.size
        indices, values = select(flat, count, method, None, None, seed)  # inside the call: NaN fails every rank
        indices = np.asarray(indices, np.int64)
        cuts = np.searchsorted(indices, bounds)

        def piece(shard: int) -> tuple[np.ndarray, np.ndarray]:
            return indices[cuts[shard]:cuts[shard + 1]] - bounds[shard], values[cuts[shard]:cuts[shard + 1]]

        owned = [shard for shard in range(shards) if _owner(ranks, shard) == me]
        waits = [call.recv(peer, shard, limit=payload_limit(count, bounds[shard + 1] - bounds[shard], flat.dtype,
                                                              None))
                 for shard in owned for peer in range(ranks) if peer != me]
        sends = []
        for shard in range(shards):
            if _owner(ranks, shard) != me:
                shard_indices, shard_values = piece(shard)
                sends.append(call.send(_owner(ranks, shard), shard, *sparse_buffers(
                    shard_indices, [shard_values], bounds[shard + 1] - bounds[shard])))
        payloads = iter((await _all(sends + waits))[len(sends):])
        call.stats.rounds += 1
        sums, candidates = {}, {}
        for shard in owned:
            length = bounds[shard + 1] - bounds[shard]
            parts = [piece(shard) if peer == me else decode_sparse(next(payloads), length, flat.dtype, None)
                     for peer in range(ranks)]
            union, summed = sum_in_rank_order(parts, flat.dtype)
            dense_sum = np.zeros(length, flat.dtype)
            dense_sum[union] = summed
            sums[shard] = dense_sum
            nonzero = summed != 0
            candidates[shard] = (union[nonzero], summed[nonzero])
        return sums, (indices, values), candidates

    return await local.run(signature, body, timeout)


async def _from_candidates(between: Awaitable[CollectiveResult], shard_sum: np.ndarray, count: int,
                           indices: np.ndarray, values: np.ndarray) -> CollectiveResult:
    """Step 2 with the shard's top ``count`` taken among the nonzero entries of its sum (at most
    k of them) rather than by reading the dense shard again: the same set (ties by lower index,
    indices ascending), since the dense shard is zero elsewhere, whenever there are at least
    ``count`` such entries; with fewer, zeros enter the top and the dense selection decides."""
    if indices.size < count:
        return await between
    with preselected(shard_sum, count, *kernels.topk_sparse(indices, values, count)):
        return await between


def _shard_k(table: HostTable, count: int) -> list[int]:
    """k_j for each shard: k split over the shards as d is (so k_j <= its shard's size)."""
    bounds = chunk_bounds(count, table.shard_count)
    return [high - low for low, high in zip(bounds[:-1], bounds[1:])]


async def _between_hosts(inter: Group, algorithm: str, shard_sum: np.ndarray, shard: int, count: int,
                         step: int, seed: int, timeout: float | None, options: dict) -> CollectiveResult:
    """Step 2 on one shard: the algorithm over the owners of this shard on every host."""
    if algorithm == "dense":
        total, stats = await allreduce(inter, shard_sum, timeout=timeout)
        return CollectiveResult(SparseResult(None, total, shard_sum.size, None, shard_sum), stats)
    if algorithm == "gtopk":
        return await gtopk(inter, shard_sum, k=count, seed=seed, step=step, timeout=timeout, **options)
    if algorithm == "cltk":
        return await cltk(inter, shard_sum, k=count, seed=seed, step=step + shard, timeout=timeout, **options)
    return await sparse_allgather(inter, shard_sum, k=count, seed=seed, step=step, timeout=timeout, **options)


ShardResult = tuple[np.ndarray | None, np.ndarray, np.ndarray | None]
"""A shard's result indices (None: dense), values, and which entries hold this host's sum."""


async def host_allgather(local: Group, results: dict[int, SparseResult], bounds: list[int], shards: int,
                         dtype: np.dtype, dense: bool,
                         timeout: float | None) -> tuple[dict[int, ShardResult], CommStats]:
    """Step 3: {shard: (result indices or None, values, which entries hold this host's sum)}
    for every shard, from its owner on this host."""
    signature = Signature(Op.CUSTOM, Algorithm.SCATTER_ALLGATHER, dtype_code(dtype), ReduceOp.SUM, -1,
                          bounds[-1], shards, _GATHER + int(dense))

    async def body(call: Call) -> dict[int, tuple]:
        me, size = call.rank, call.size
        gathered: dict[int, tuple] = {}
        sends = []
        for shard, result in results.items():
            if result.indices is None:
                gathered[shard] = (None, result.values, None)
                buffers = [result.values]
            else:
                mask = np.isin(result.indices, result.sent_indices, assume_unique=True)
                gathered[shard] = (result.indices, result.values, mask)
                buffers = [*sparse_buffers(result.indices, [result.values], bounds[shard + 1] - bounds[shard]),
                           np.packbits(mask)]
            sends += [call.send(peer, shard, *buffers) for peer in range(size) if peer != me]
        others = [shard for shard in range(shards) if _owner(size, shard) != me]
        waits = [call.recv(_owner(size, shard), shard, limit=_gather_limit(bounds, shard, dtype, dense))
                 for shard in others]
        payloads = (await _all(sends + waits))[len(sends):]
        for shard, payload in zip(others, payloads):
            gathered[shard] = _decode_shard(payload, bounds[shard + 1] - bounds[shard], dtype, dense, call.rank)
        call.stats.rounds += 1
        return gathered

    return await local.run(signature, body, timeout)


def _gather_limit(bounds: list[int], shard: int, dtype: np.dtype, dense: bool) -> int:
    length = bounds[shard + 1] - bounds[shard]
    if dense:
        return length * np.dtype(dtype).itemsize
    return sparse_payload_size(length, length, dtype, None) + (length + 7) // 8


def _decode_shard(payload, length: int, dtype: np.dtype, dense: bool, rank: int) -> tuple:
    """A shard's result as its owner sent it; FrameError if malformed."""
    view = memoryview(payload)
    if dense:
        if len(view) != length * np.dtype(dtype).itemsize:
            raise FrameError(f"hierarchical shard of {len(view)} bytes for {length} values", rank=rank)
        return None, np.frombuffer(view, dtype, length), None
    if len(view) < 8:
        raise FrameError(f"hierarchical shard of {len(view)} bytes has no count", rank=rank)
    count = int(np.frombuffer(view, np.uint64, 1)[0])
    if count > length:
        raise FrameError(f"hierarchical shard announces {count} entries of a {length}-element shard", rank=rank)
    sparse_bytes = sparse_payload_size(count, length, dtype, None)
    if len(view) != sparse_bytes + (count + 7) // 8:
        raise FrameError(f"hierarchical shard of {len(view)} bytes does not hold {count} entries", rank=rank)
    indices, parts = split_sparse(view[:sparse_bytes], length, dtype, None)
    mask = np.unpackbits(np.frombuffer(view[sparse_bytes:], np.uint8), count=count).astype(bool)
    return indices, parts[0], mask


async def hierarchical_reduce(group: Group, grad: np.ndarray, algorithm: str, *, ticket: int | None = None,
                              k: int | None = None, density: float | None = None, step: int = 0, seed: int = 0,
                              timeout: float | None = None, **options: Any) -> CollectiveResult:
    """Sum ``grad`` over the group in two levels (steps in the module docstring); value is a
    :class:`SparseResult` over the whole gradient, stats the sum of all three steps.

    ``ticket`` is this call's place in ``group.topology.order``, taken when the call began
    (:func:`reduce_gradient` takes it); without one, the call takes the next.
    """
    if algorithm not in HIERARCHICAL_ALGORITHMS:
        raise InvalidArgumentError(f"no two-level {algorithm!r}; choose from {list(HIERARCHICAL_ALGORITHMS)}",
                                   rank=group.rank)
    order = group.topology.order
    ticket = order.ticket() if ticket is None else ticket
    try:
        return await _two_levels(group, grad, algorithm, ticket, k, density, step, seed, timeout, options)
    finally:
        order.passed(ticket)  # the steps it did not reach: later calls must not wait for them


async def _two_levels(group: Group, grad: np.ndarray, algorithm: str, ticket: int, k: int | None,
                      density: float | None, step: int, seed: int, timeout: float | None,
                      options: dict) -> CollectiveResult:
    started = time.perf_counter()
    flat = float_vector(grad)
    size = flat.size
    dense = algorithm == "dense"
    topology = await group.topology.discover(timeout)
    table, groups, order = topology.table, topology.groups, topology.order
    shards = table.shard_count
    bounds = chunk_bounds(size, shards)
    counts: list[int | None]
    if dense:
        counts = [0] * shards
    elif options.get("selection", "topk").startswith("topk"):
        counts = _shard_k(table, resolve_k(size, k, density))
    else:
        counts = [None] * shards  # threshold and random-k select by their own rule on each shard
    stats = CommStats()
    selected = None  # this rank's own top-k, when step 1 sums selections rather than whole shards
    candidates: dict[int, tuple] = {}  # each owned shard's host sum as pairs (step 1's sparse path)
    if algorithm in SPARSE_SCATTER and options.get("selection", "topk").startswith("topk"):
        count = resolve_k(size, k, density)
        method = "topk-exact" if options.get("exact") or options.get("selection") == "topk-exact" else "topk"
        scatter_call = host_sparse_reduce_scatter(groups.scatter, flat, bounds, shards, count, method,
                                                  seed + 104729 * group.rank + 7919 * step, timeout)
    else:
        scatter_call = host_reduce_scatter(groups.scatter, flat, bounds, shards, timeout)
    [scatter] = await order.start(ticket, 0, [scatter_call])
    sums, phase = await scatter
    if isinstance(sums, tuple):
        sums, selected, candidates = sums
    stats += phase

    def one_shard(shard: int) -> Awaitable[CollectiveResult]:
        extra = dict(options)
        if counts[shard] is None:
            extra["density"] = density
        between = _between_hosts(groups.inter[shard], algorithm, sums[shard], shard, counts[shard],
                                 step, seed, timeout, extra)
        if shard in candidates:
            return _from_candidates(between, sums[shard], counts[shard], *candidates[shard])
        return between

    owned = sorted(sums)
    outcomes = await _all(await order.start(ticket, 1, [one_shard(shard) for shard in owned]))
    for outcome in outcomes:
        stats += outcome.stats
    results = {shard: outcome.value for shard, outcome in zip(owned, outcomes)}
    [gather] = await order.start(ticket, 2, [host_allgather(groups.gather, results, bounds, shards, flat.dtype,
                                                             dense, timeout)])
    gathered, phase = await gather
    stats += phase
    stats.seconds = time.perf_counter() - started
    return CollectiveResult(_assemble(gathered, bounds, flat, dense, selected), stats)


def _assemble(gathered: dict[int, tuple], bounds: list[int], flat: np.ndarray, dense: bool,
              selected: tuple | None = None) -> SparseResult:
    """The whole gradient's result from its shards, and this rank's own values where its host's
    sum entered it (of those it ``selected`` into the host's sum, when step 1 summed selections)."""
    size = flat.size
    if dense:
        values = np.concatenate([gathered[shard][1] for shard in range(len(bounds) - 1)]) if size else flat[:0].copy()
        return SparseResult(None, values.astype(flat.dtype, copy=False), size, None, flat)
    indices, values, sent = [], [], []
    for shard in range(len(bounds) - 1):
        shard_indices, shard_values, mask = gathered[shard]
        global_indices = np.asarray(shard_indices, np.int64) + bounds[shard]
        indices.append(global_indices)
        values.append(np.asarray(shard_values, flat.dtype))
        sent.append(global_indices[mask])
    all_indices = np.concatenate(indices)
    sent_indices = np.concatenate(sent)
    if selected is not None:
        sent_indices = np.intersect1d(sent_indices, selected[0], assume_unique=True)
    return SparseResult(all_indices, np.concatenate(values), size, sent_indices, flat[sent_indices])
