"""Sparse allgather (Aji & Heafield 2017; Top-k S-SGD): every rank's selection, summed locally.

1. Each rank selects (indices, values) of its gradient: top-k, threshold, or unbiased random-k.
2. The selections travel around a ring, each forwarded P-1 times: (P-1)·k pairs per rank.
3. Every rank sums all selections in rank order, so the result is bit-identical everywhere.
Values may travel quantized (``quantize_bits``); the result then sums the decoded values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sparsecoll.call import Call, CollectiveResult
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


async def sparse_allgather(group: Group, grad: np.ndarray, *, k: int | None = None,
                           density: float | None = None, selection: str = "topk",
                           threshold: float | None = None, quantize_bits: int | None = None,
                           seed: int = 0, step: int = 0, timeout: float | None = None) -> CollectiveResult:
    """Sum of every rank's sparse selection; value is a :class:`SparseResult`."""
    flat = float_vector(grad)
    size = flat.size
    if selection not in SELECTIONS:
        raise InvalidArgumentError(f"unknown selection {selection!r}; choose from {sorted(SELECTIONS)}")
    fixed_k = selection.startswith("topk")
    count = resolve_k(size, k, density) if fixed_k else 0
    rank_seed = seed + 7919 * step + 104729 * group.rank
    signature = Signature(Op.SPARSE_ALLGATHER, SELECTIONS[selection], dtype_code(flat.dtype),
                          ReduceOp.SUM, -1, size, count, quantize_bits or 0)
    limit = payload_limit(count if fixed_k else size, size, flat.dtype, quantize_bits)

    async def body(call: Call) -> SparseResult:
        # selecting inside the call: a bad gradient (NaN/inf) aborts every rank, not just this one
        indices, values = select(flat, count, selection, threshold, density, rank_seed)
        wire_values, sent_values = encode_values(values, quantize_bits, rank_seed)
        blocks = await ring_gather_blocks(call, own_block(indices, wire_values, size), limit)
        parts = [(indices, sent_values) if r == call.rank else
                 decode_sparse(blocks[r], size, flat.dtype, quantize_bits) for r in range(call.size)]
        union, summed = sum_in_rank_order(parts, flat.dtype)
        return SparseResult(union, summed, size, indices, sent_values)

    return await group.run(signature, body, timeout)
