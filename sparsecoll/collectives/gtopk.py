"""gTop-k (Shi et al. 2019): the global top-k by recursive doubling, O(k log P) per rank.

1. Each rank selects its local top-k (indices ascending).
2. In round r it exchanges its current k pairs with the rank at distance 2^r, merges the two
   sparse vectors (summing shared indices) and keeps the top k of the merge. Both partners
   compute the same merge (addition commutes, ties break by index), so after log2 P rounds
   every rank holds the same k pairs, bit for bit.
3. P not a power of two: ranks 0..2e-1 (e = P - 2^floor(log2 P)) pair up first; each even
   one hands its k pairs to its odd neighbour, which merges them, and sits the rounds out;
   each odd one sends it the result at the end (see :mod:`.doubling`).
Each merge truncates to k, so the result is the paper's approximation of the top-k of the
summed selections: exactly it for P = 2, close to it otherwise. ``sent_indices`` marks the
local entries whose value is in the result: those that survived *every* merge on the way (an
entry dropped in round 1 stays out even if its index comes back from a later partner, whose
sum lacks it). A host tracks this for its folded neighbour and sends it back as a bit mask.
The rest belongs in the error-feedback residual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sparsecoll import kernels
from sparsecoll.call import Call, CollectiveResult
from sparsecoll.collectives.doubling import DoublingPlan
from sparsecoll.collectives.sparse_common import (
    SparseResult,
    decode_sparse,
    encode_values,
    float_vector,
    payload_limit,
    resolve_k,
    select,
)
from sparsecoll.errors import FrameError
from sparsecoll.wire import Algorithm, Op, ReduceOp, Signature, dtype_code, sparse_buffers

if TYPE_CHECKING:
    from sparsecoll.group import Group


def merge_top(mine: tuple[np.ndarray, np.ndarray], theirs: tuple[np.ndarray, np.ndarray],
              k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k of the sum of two sparse vectors (indices ascending)."""
    indices, values = kernels.merge_sorted(mine[0], mine[1], theirs[0], theirs[1])
    if indices.size <= k:
        return indices, values
    return kernels.topk_sparse(indices, values, k)


def _unpack_mask(payload, count: int, rank: int) -> np.ndarray:
    """The host's bit mask of which of this folded rank's ``count`` entries are in the result."""
    packed = np.frombuffer(payload, np.uint8)
    if packed.size != (count + 7) // 8:
        raise FrameError(f"gTop-k mask of {packed.size} bytes for {count} entries", rank=rank)
    return np.unpackbits(packed, count=count).astype(bool)


async def gtopk(group: Group, grad: np.ndarray, *, k: int | None = None, density: float | None = None,
                quantize_bits: int | None = None, exact: bool = False, seed: int = 0, step: int = 0,
                timeout: float | None = None) -> CollectiveResult:
    """Global top-k of the ranks' top-k selections; value is a :class:`SparseResult`."""
    flat = float_vector(grad, on_device=True)  # read only by ``select``
    size = flat.size
    count = resolve_k(size, k, density)
    signature = Signature(Op.GTOPK, Algorithm.RECURSIVE_DOUBLING, dtype_code(flat.dtype),
                          ReduceOp.SUM, -1, size, count, quantize_bits or 0)
    limit = payload_limit(count, size, flat.dtype, quantize_bits)

    async def body(call: Call) -> SparseResult:
        # selecting inside the call: a bad gradient (NaN/inf) aborts every rank, not just this one
        local_indices, local_values = select(flat, count, "topk-exact" if exact else "topk", None, None,
                                             seed + 104729 * group.rank + 7919 * step)
        rank, ranks = call.rank, call.size
        plan = DoublingPlan(rank, ranks)
        step_seed = seed + 7919 * step

        def wire(current: tuple[np.ndarray, np.ndarray], tag: int, holder: int) -> tuple[list, tuple]:
            # The sender keeps exactly what the receiver decodes, so partners stay identical; and
            # ``holder`` names the set of ranks that hold ``current``, so ranks holding the same
            # merge round it the same way, or the pairs of the next round would diverge.
            wire_values, decoded = encode_values(current[1], quantize_bits,
                                                 step_seed + 31 * tag + 104729 * (holder + 1))
            return sparse_buffers(current[0], wire_values, size), (current[0], decoded)

        def decode(payload) -> tuple[np.ndarray, np.ndarray]:
            return decode_sparse(payload, size, flat.dtype, quantize_bits)

        _, current = wire((local_indices, local_values), 0, rank)  # quantizing again is idempotent
        sent_values = current[1]
        final_tag = plan.rounds + 1
        alive = np.ones(local_indices.size, bool)  # own entries still inside ``current``'s sums
        if plan.folded:
            buffers, current = wire(current, 0, rank)
            await call.send(rank + 1, 0, *buffers)
            current = decode(await call.recv(rank + 1, final_tag, limit=limit))
            alive = _unpack_mask(await call.recv(rank + 1, final_tag + 1, limit=(count + 7) // 8),
                                 local_indices.size, call.rank)
            call.stats.rounds += 2
        else:
            guest_indices = guest_alive = None

            def prune(kept: np.ndarray) -> None:  # after every merge, drop what it cut off
                nonlocal alive, guest_alive
                alive &= np.isin(local_indices, kept, assume_unique=True)
                if guest_indices is not None:
                    guest_alive &= np.isin(guest_indices, kept, assume_unique=True)

            if plan.host:
                guest = decode(await call.recv(rank - 1, 0, limit=limit))
                guest_indices, guest_alive = guest[0], np.ones(guest[0].size, bool)
                current = merge_top(current, guest, count)
                call.stats.rounds += 1
                prune(current[0])
            for round_index in range(plan.rounds):
                partner = plan.partner(round_index)
                buffers, current = wire(current, round_index + 1, ranks + (plan.virtual >> round_index))
                theirs = decode(await call.exchange(partner, buffers, partner, None, round_index + 1, limit))
                current = merge_top(current, theirs, count)
                prune(current[0])
            call.stats.rounds += plan.rounds
            if plan.extra:  # every rank rounds the result alike, as the folded ones receive it
                buffers, current = wire(current, final_tag, -1)
            if plan.host:
                await call.send(rank - 1, final_tag, *buffers)
                await call.send(rank - 1, final_tag + 1, np.packbits(guest_alive))
                call.stats.rounds += 1
        return SparseResult(current[0], current[1], size, local_indices[alive], sent_values[alive])

    return await group.run(signature, body, timeout)
