"""Sparse allgather (Aji & Heafield 2017; Top-k S-SGD): every rank's selection, summed locally.

1. Each rank selects (indices, values) of its gradient: top-k, threshold (a fixed cut, or with
   ``density`` alone a cut sampled for that density, as Aji & Heafield do), or unbiased random-k
   (Wangni et al.; with ``variance_budget`` their variance-budget form instead of a density).
   Indices travel as uint32 (int64 when d >= 2^32).
2. The selections travel around a ring, each forwarded P-1 times: (P-1)·k pairs per rank.
3. Every rank sums all selections in rank order, so the result is bit-identical everywhere.
Values may travel quantized (``quantize_bits``); the result then sums the decoded values.

With ``lazy`` (a :class:`LazyState`, LAQ-style) a rank whose selection moved little since the
one it last sent (:func:`.lazy.sparse_skip`) sends an empty block meaning "reuse", and every
rank sums that rank's stale (indices, values) from its previous send instead; all ranks keep
the same stale copies, so they still agree bit for bit. For error feedback a skipping rank
reports nothing sent: its whole gradient stays in its residual, while the sum holds its stale
contribution, which its residual already gave up the round it was sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sparsecoll.call import Call, CollectiveResult
from sparsecoll.collectives.lazy import LazyState, keep_contributions, sparse_skip, stale_contribution
from sparsecoll.collectives.sparse_common import (
    SELECTIONS,
    SparseResult,
    decode_sparse,
    encode_values,
    float_vector,
    own_block,
    payload_limit,
    resolve_k,
    ring_gather_blocks,
    select,
    sum_in_rank_order,
)
from sparsecoll.errors import InvalidArgumentError
from sparsecoll.wire import Op, ReduceOp, Signature, dtype_code

if TYPE_CHECKING:
    from sparsecoll.group import Group

REUSE = [np.empty(0, np.uint8)]
"""A lazy rank's block when it skips: zero bytes, where a sparse payload has at least its count."""


async def sparse_allgather(group: Group, grad: np.ndarray, *, k: int | None = None,
                           density: float | None = None, selection: str = "topk",
                           threshold: float | None = None, quantize_bits: int | None = None,
                           seed: int = 0, step: int = 0, lazy: LazyState | None = None,
                           variance_budget: float | None = None, timeout: float | None = None) -> CollectiveResult:
    """Sum of every rank's sparse selection; value is a :class:`SparseResult`."""
    flat = float_vector(grad, on_device=True)  # read only by ``select``
    size = flat.size
    if selection not in SELECTIONS:
        raise InvalidArgumentError(f"unknown selection {selection!r}; choose from {sorted(SELECTIONS)}")
    if lazy is not None:
        lazy.validate()
    fixed_k = selection.startswith("topk")
    count = resolve_k(size, k, density) if fixed_k else 0
    rank_seed = seed + 7919 * step + 104729 * group.rank
    signature = Signature(Op.LAZY if lazy is not None else Op.SPARSE_ALLGATHER, SELECTIONS[selection],
                          dtype_code(flat.dtype), ReduceOp.SUM, -1, size, count, quantize_bits or 0)
    limit = payload_limit(count if fixed_k else size, size, flat.dtype, quantize_bits)

    async def body(call: Call) -> SparseResult:
        # selecting inside the call: a bad gradient (NaN/inf) aborts every rank, not just this one
        indices, values = select(flat, count, selection, threshold, density, rank_seed, variance_budget)
        skip = lazy is not None and sparse_skip(lazy, call.rank, call.size, indices, values)
        wire_values, sent_values = encode_values(values, quantize_bits, rank_seed)
        blocks = await ring_gather_blocks(call, REUSE if skip else own_block(indices, wire_values, size), limit)
        reused = [lazy is not None and (skip if rank == call.rank else len(block) == 0)
                  for rank, block in enumerate(blocks)]
        parts = []
        for rank, block in enumerate(blocks):
            if reused[rank]:
                parts.append(stale_contribution(lazy, rank, call.rank))
            elif rank == call.rank:
                parts.append((indices, sent_values))
            else:
                parts.append(decode_sparse(block, size, flat.dtype, quantize_bits))
        union, summed = sum_in_rank_order(parts, flat.dtype)
        if lazy is not None:
            keep_contributions(lazy, parts)
            lazy.record(skip, sum(reused))
        if skip:  # nothing new was sent: the whole gradient stays in the residual
            return SparseResult(union, summed, size, np.empty(0, np.int64), np.empty(0, flat.dtype))
        return SparseResult(union, summed, size, indices, sent_values)

    return await group.run(signature, body, timeout)
