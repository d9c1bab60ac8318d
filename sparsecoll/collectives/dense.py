"""Dense collectives: the baseline every sparse algorithm is measured against.

Allreduce uses recursive doubling for small arrays (log2 P rounds, latency-bound) and the
bandwidth-optimal ring for large ones (reduce-scatter then allgather, 2(P-1)/P of the data
sent per rank). Allgather(v) is a ring; broadcast a binomial tree for small arrays and a
segmented chain (pipelined) for large ones; barrier a dissemination barrier. Every
algorithm reduces in the same order on every rank, so all ranks get bit-identical results.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import TYPE_CHECKING

import numpy as np

from sparsecoll.arrays import as_sendable, result_buffer
from sparsecoll.call import Call, CollectiveResult
from sparsecoll.collectives.doubling import DoublingPlan
from sparsecoll.errors import FrameError, InvalidArgumentError
from sparsecoll.wire import Algorithm, Op, ReduceOp, Signature, dtype_code, shape_hash

if TYPE_CHECKING:
    from sparsecoll.group import Group

SMALL_ALLREDUCE_BYTES = 64 * 1024
"""Arrays up to this size are allreduced by recursive doubling, larger ones by the ring."""
SMALL_BROADCAST_BYTES = 256 * 1024
"""Arrays up to this size are broadcast along a binomial tree, larger ones along a chain."""
SEGMENT_BYTES = 2 << 20
"""Large transfers are cut into frames of this size so receiving overlaps reducing."""

REDUCE_OPS = {"sum": ReduceOp.SUM, "mean": ReduceOp.MEAN, "max": ReduceOp.MAX,
              "min": ReduceOp.MIN, "prod": ReduceOp.PROD}
_UFUNCS = {ReduceOp.SUM: np.add, ReduceOp.MEAN: np.add, ReduceOp.MAX: np.maximum,
           ReduceOp.MIN: np.minimum, ReduceOp.PROD: np.multiply}


# --------------------------------------------------------------------------- helpers
def chunk_bounds(count: int, parts: int) -> list[int]:
    """Offsets that split ``count`` items into ``parts`` near-equal chunks (larger ones first)."""
    base, extra = divmod(count, parts)
    bounds = [0]
    for index in range(parts):
        bounds.append(bounds[-1] + base + (1 if index < extra else 0))
    return bounds


def _segments(length: int, segment: int) -> list[tuple[int, int]]:
    """(start, stop) pieces of at most ``segment`` items; one empty piece for length 0."""
    if length == 0:
        return [(0, 0)]
    return [(start, min(start + segment, length)) for start in range(0, length, segment)]


def _segment_items(dtype: np.dtype) -> int:
    return max(1, SEGMENT_BYTES // dtype.itemsize)


async def _send_segments(call: Call, peer: int, data: np.ndarray, segment: int, tag_base: int) -> None:
    for index, (start, stop) in enumerate(_segments(len(data), segment)):
        await call.send(peer, tag_base + index, data[start:stop])


async def pipelined_step(call: Call, send_peer: int, send_data: np.ndarray, recv_peer: int,
                         target: np.ndarray, tag_base: int, scratch: np.ndarray | None = None,
                         ufunc: np.ufunc | None = None) -> None:
    """Send ``send_data`` to one peer while receiving ``target``'s length from another.

    Without ``ufunc`` the payload lands in ``target`` directly; with it, each segment lands
    in ``scratch`` and is reduced into ``target`` while later segments are still arriving.
    """
    segment = _segment_items(target.dtype)
    landing = target if ufunc is None else scratch
    pieces = _segments(len(target), segment)
    posted = [call.post(recv_peer, tag_base + index, landing[start:stop])
              for index, (start, stop) in enumerate(pieces)]
    if len(pieces) == 1 and len(send_data) <= segment:
        await call.send(send_peer, tag_base, send_data)
        await call.wait(posted[0])
        if ufunc is not None:
            ufunc(target, scratch[:len(target)], out=target)
        return
    sender = asyncio.ensure_future(_send_segments(call, send_peer, send_data, segment, tag_base))
    try:
        for received, (start, stop) in zip(posted, pieces):
            await call.wait(received)
            if ufunc is not None:
                ufunc(target[start:stop], scratch[start:stop], out=target[start:stop])
        await sender
    finally:
        if not sender.done():
            sender.cancel()


def _tag_stride(largest: int, dtype: np.dtype) -> int:
    return len(_segments(largest, _segment_items(dtype)))


# --------------------------------------------------------------------------- allreduce
async def ring_allreduce(call: Call, flat: np.ndarray, ufunc: np.ufunc, tag_base: int = 0) -> None:
    """Reduce-scatter then allgather around the ring, in place on ``flat``."""
    size, rank = call.size, call.rank
    right, left = (rank + 1) % size, (rank - 1) % size
    bounds = chunk_bounds(flat.size, size)
    largest = bounds[1] - bounds[0]
    stride = _tag_stride(largest, flat.dtype)
    scratch = np.empty(largest, flat.dtype)

    def chunk(index: int) -> np.ndarray:
        return flat[bounds[index]:bounds[index + 1]]

    for step in range(size - 1):
        await pipelined_step(call, right, chunk((rank - step) % size), left,
                             chunk((rank - step - 1) % size), tag_base + step * stride, scratch, ufunc)
    for step in range(size - 1):
        await pipelined_step(call, right, chunk((rank - step + 1) % size), left,
                             chunk((rank - step) % size), tag_base + (size - 1 + step) * stride)
    call.stats.rounds += 2 * (size - 1)


async def recursive_doubling_allreduce(call: Call, flat: np.ndarray, ufunc: np.ufunc,
                                       tag_base: int = 0) -> None:
    """Exchange-and-reduce with partners at distance 1, 2, 4...; in place on ``flat``.

    For P not a power of two, ranks fold in first and out last (see :mod:`.doubling`).
    """
    plan = DoublingPlan(call.rank, call.size)
    scratch = np.empty_like(flat)
    final_tag = tag_base + plan.rounds + 1
    if plan.folded:
        await call.send(plan.rank + 1, tag_base, flat)
        await call.recv(plan.rank + 1, final_tag, flat)
        call.stats.rounds += 2
        return
    if plan.host:
        await call.recv(plan.rank - 1, tag_base, scratch)
        ufunc(flat, scratch, out=flat)
        call.stats.rounds += 1
    for round_index in range(plan.rounds):
        partner = plan.partner(round_index)
        await call.exchange(partner, flat, partner, scratch, tag=tag_base + round_index + 1)
        ufunc(flat, scratch, out=flat)
    call.stats.rounds += plan.rounds
    if plan.host:
        await call.send(plan.rank - 1, final_tag, flat)
        call.stats.rounds += 1


async def allreduce(group: Group, array: np.ndarray, op: str = "sum", *, out: np.ndarray | None = None,
                    timeout: float | None = None, algorithm: Algorithm | None = None) -> CollectiveResult:
    """Element-wise reduction of equally shaped arrays over all ranks (see Group.allreduce)."""
    reduce_op = REDUCE_OPS.get(op)
    if reduce_op is None:
        raise InvalidArgumentError(f"unknown op {op!r}; choose from {sorted(REDUCE_OPS)}", rank=group.rank)
    array = as_sendable(array, group.rank)
    if reduce_op == ReduceOp.MEAN and array.dtype.kind != "f":
        raise InvalidArgumentError(f"mean needs a floating dtype, not {array.dtype}", rank=group.rank)
    result = result_buffer(array, out, array.shape, group.rank)
    if algorithm is None:
        small = array.nbytes <= SMALL_ALLREDUCE_BYTES or array.size < group.size
        algorithm = Algorithm.RECURSIVE_DOUBLING if small else Algorithm.RING
    signature = Signature(Op.ALLREDUCE, algorithm, dtype_code(array.dtype), reduce_op, -1,
                          array.size, 0, shape_hash(array.shape))
    if result is not array:
        np.copyto(result, array)
    ufunc = _UFUNCS[reduce_op]

    async def body(call: Call) -> np.ndarray:
        flat = result.reshape(-1)
        if call.size > 1:
            if algorithm == Algorithm.RING:
                await ring_allreduce(call, flat, ufunc)
            else:
                await recursive_doubling_allreduce(call, flat, ufunc)
        if reduce_op == ReduceOp.MEAN:
            np.divide(flat, call.size, out=flat)
        return result

    return await group.run(signature, body, timeout)


# --------------------------------------------------------------------------- allgather
async def ring_allgather(call: Call, blocks: list[np.ndarray], tag_base: int = 0) -> None:
    """Fill ``blocks[i]`` on every rank with rank i's block (this rank's is already in place)."""
    size, rank = call.size, call.rank
    right, left = (rank + 1) % size, (rank - 1) % size
    largest = max(len(block) for block in blocks)
    stride = _tag_stride(largest, blocks[0].dtype)
    for step in range(size - 1):
        await pipelined_step(call, right, blocks[(rank - step) % size], left,
                             blocks[(rank - step - 1) % size], tag_base + step * stride)
    call.stats.rounds += size - 1


async def allgather(group: Group, array: np.ndarray, *, out: np.ndarray | None = None,
                    timeout: float | None = None) -> CollectiveResult:
    """Stack every rank's equally shaped array into shape (size, *array.shape)."""
    array = as_sendable(array, group.rank)
    result = result_buffer(array, out, (group.size, *array.shape), group.rank)
    signature = Signature(Op.ALLGATHER, Algorithm.RING, dtype_code(array.dtype), 0, -1,
                          array.size, 0, shape_hash(array.shape))
    result[group.rank] = array

    async def body(call: Call) -> np.ndarray:
        if call.size > 1:
            rows = result.reshape(call.size, -1)
            await ring_allgather(call, [rows[index] for index in range(call.size)])
        return result

    return await group.run(signature, body, timeout)


async def allgatherv(group: Group, array: np.ndarray, *, counts: list[int] | None = None,
                     timeout: float | None = None) -> CollectiveResult:
    """Gather 1-D arrays of different lengths; the value lists them in rank order.

    Without ``counts`` the lengths are exchanged first (one small ring allgather inside the
    same call); with ``counts`` every rank must pass the same list.
    """
    array = as_sendable(array, group.rank).reshape(-1)
    if counts is not None:
        counts = [int(count) for count in counts]
        if len(counts) != group.size or min(counts) < 0 or counts[group.rank] != array.size:
            raise InvalidArgumentError(
                f"counts {counts} do not describe {group.size} ranks with {array.size} items "
                f"on rank {group.rank}", rank=group.rank)
    counts_hash = zlib.crc32(np.asarray(counts, np.int64).tobytes()) if counts is not None else 0
    signature = Signature(Op.ALLGATHERV, Algorithm.RING, dtype_code(array.dtype), 0, -1,
                          sum(counts) if counts is not None else 0, 0, counts_hash)

    async def body(call: Call) -> list[np.ndarray]:
        known = counts
        tag_base = 0
        if known is None:
            sizes = np.zeros(call.size, np.int64)
            sizes[call.rank] = array.size
            if call.size > 1:
                await ring_allgather(call, [sizes[index:index + 1] for index in range(call.size)])
            known = [int(count) for count in sizes]
            if min(known) < 0:
                raise FrameError(f"peer announced a negative count in {known}", rank=call.rank)
            tag_base = call.size
        offsets = np.concatenate([[0], np.cumsum(known)]).astype(np.int64)
        gathered = np.empty(int(offsets[-1]), array.dtype)
        blocks = [gathered[offsets[index]:offsets[index + 1]] for index in range(call.size)]
        blocks[call.rank][:] = array
        if call.size > 1:
            await ring_allgather(call, blocks, tag_base)
        return blocks

    return await group.run(signature, body, timeout)


# --------------------------------------------------------------------------- broadcast
async def binomial_broadcast(call: Call, flat: np.ndarray, root: int, tag: int = 0) -> None:
    """Root's data down a binomial tree: log2 P rounds, each rank receives once."""
    size = call.size
    virtual = (call.rank - root) % size
    mask = 1
    while mask < size:
        if virtual & mask:
            await call.recv((virtual - mask + root) % size, tag, flat)
            break
        mask <<= 1
    mask >>= 1
    while mask > 0:
        if virtual + mask < size:
            await call.send((virtual + mask + root) % size, tag, flat)
        mask >>= 1
    call.stats.rounds += max(1, (size - 1).bit_length())


async def chain_broadcast(call: Call, flat: np.ndarray, root: int, tag_base: int = 0) -> None:
    """Root's data along the ring in segments, each rank forwarding as segments arrive."""
    size = call.size
    virtual = (call.rank - root) % size
    left, right = (call.rank - 1) % size, (call.rank + 1) % size
    pieces = _segments(len(flat), _segment_items(flat.dtype))
    posted = [call.post(left, tag_base + index, flat[start:stop]) for index, (start, stop) in enumerate(pieces)] \
        if virtual != 0 else []
    for index, (start, stop) in enumerate(pieces):
        if posted:
            await call.wait(posted[index])
        if virtual != size - 1:
            await call.send(right, tag_base + index, flat[start:stop])
    call.stats.rounds += size - 1


async def broadcast(group: Group, array: np.ndarray, root: int = 0, *, out: np.ndarray | None = None,
                    timeout: float | None = None) -> CollectiveResult:
    """Root's array on every rank (others pass an array of the same shape and dtype)."""
    if not 0 <= root < group.size:
        raise InvalidArgumentError(f"root {root} is not a rank of a group of {group.size}", rank=group.rank)
    array = as_sendable(array, group.rank)
    result = result_buffer(array, out, array.shape, group.rank)
    small = array.nbytes <= SMALL_BROADCAST_BYTES or group.size <= 2
    algorithm = Algorithm.BINOMIAL_TREE if small else Algorithm.RING
    signature = Signature(Op.BROADCAST, algorithm, dtype_code(array.dtype), 0, root,
                          array.size, 0, shape_hash(array.shape))
    if group.rank == root and result is not array:
        np.copyto(result, array)

    async def body(call: Call) -> np.ndarray:
        if call.size > 1:
            flat = result.reshape(-1)
            if algorithm == Algorithm.BINOMIAL_TREE:
                await binomial_broadcast(call, flat, root)
            else:
                await chain_broadcast(call, flat, root)
        return result

    return await group.run(signature, body, timeout)


# --------------------------------------------------------------------------- barrier
async def barrier(group: Group, *, timeout: float | None = None) -> CollectiveResult:
    """Dissemination barrier: in round k each rank signals rank + 2^k and hears rank - 2^k."""
    signature = Signature(Op.BARRIER, Algorithm.DISSEMINATION)
    empty = np.empty(0, np.uint8)

    async def body(call: Call) -> None:
        distance, round_index = 1, 0
        while distance < call.size:
            await call.exchange((call.rank + distance) % call.size, empty,
                                (call.rank - distance) % call.size, empty, tag=round_index)
            distance <<= 1
            round_index += 1
        call.stats.rounds += round_index

    return await group.run(signature, body, timeout)
