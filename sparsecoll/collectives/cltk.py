"""CLT-k (ScaleCom, Chen et al. 2020): a rotating leader's top-k indices, then a k-sized allreduce.

1. The leader of this step (``step mod P``) selects its local top-k indices.
2. The indices go down a pipelined chain from the leader: each rank forwards them once.
3. Every rank reads its own values at those indices and a ring allreduce sums them.
Both phases send O(k) bytes per rank whatever P is (the chain and the ring never make a rank
send more than its share), so CLT-k scales to many ranks where allgather does not.
With ``quantize_bits`` the values ring goes at b bits (:mod:`.quantized_ring`); the rounding
noise then belongs to partial sums of several ranks, so ``sent_values`` stay the exact local
values (the rounding is unbiased, not fed back).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sparsecoll.call import Call, CollectiveResult
from sparsecoll.collectives.dense import chain_broadcast
from sparsecoll.collectives.quantized_ring import check_bits, ring_sum
from sparsecoll.collectives.sparse_common import SparseResult, float_vector, gather_values, resolve_k, select
from sparsecoll.errors import FrameError
from sparsecoll.wire import Algorithm, Op, ReduceOp, Signature, dtype_code, index_dtype

if TYPE_CHECKING:
    from sparsecoll.group import Group

VALUE_TAGS = 1 << 20


async def cltk(group: Group, grad: np.ndarray, *, k: int | None = None, density: float | None = None,
               step: int = 0, seed: int = 0, quantize_bits: int | None = None,
               timeout: float | None = None) -> CollectiveResult:
    """Sum of every rank's values at the step leader's top-k indices."""
    if quantize_bits is not None:
        check_bits(quantize_bits)
    flat = float_vector(grad, on_device=True)  # read only by ``select`` and ``gather_values``
    size = flat.size
    count = resolve_k(size, k, density)
    leader = step % group.size
    indices = np.zeros(count, index_dtype(size))
    signature = Signature(Op.CLTK, Algorithm.RING, dtype_code(flat.dtype), ReduceOp.SUM, leader,
                          size, count, quantize_bits or 0)

    async def body(call: Call) -> SparseResult:
        if call.rank == leader:  # inside the call: a NaN gradient aborts every rank
            indices[:] = select(flat, count, "topk", None, None, seed + step)[0]
        if call.size > 1:
            await chain_broadcast(call, indices, leader)
        chosen = indices.astype(np.int64)
        if count and int(chosen.max()) >= size:
            raise FrameError(f"leader {leader} sent indices outside [0, {size})", rank=call.rank)
        mine = gather_values(flat, chosen)
        summed = mine.copy()
        await ring_sum(call, summed, quantize_bits, seed + step, VALUE_TAGS)
        return SparseResult(chosen, summed, size, chosen, mine)

    return await group.run(signature, body, timeout)
