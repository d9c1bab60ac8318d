"""Lazy aggregation in the spirit of LAG / LAQ (Chen et al. 2018, 2019): skip what changed little.

Every rank keeps the sum of the ranks' last *sent* gradients. At each round a rank sends the
change since its own last send, or nothing when that change is small:
``|g - g_sent|^2 <= threshold * |g|^2`` (and it has not skipped ``max_stale`` rounds in a row).
The changes travel around a ring (a skipping rank contributes an empty block but still
forwards the others'), and every rank adds them, in rank order, to its running sum, which
therefore stays identical on all ranks. The result is the sum of the latest sent gradients:
stale for the ranks that skipped, exact for the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from sparsecoll.call import Call, CollectiveResult
from sparsecoll.collectives.sparse_common import SparseResult, float_vector, ring_gather_blocks
from sparsecoll.errors import FrameError, InvalidArgumentError
from sparsecoll.wire import Algorithm, Op, ReduceOp, Signature, dtype_code

if TYPE_CHECKING:
    from sparsecoll.group import Group


@dataclass
class LazyState:
    """The memory of one lazily reduced tensor; keep one per gradient (or bucket) and reuse it."""

    threshold: float = 0.1
    max_stale: int = 10
    last_sent: np.ndarray | None = None
    total: np.ndarray | None = None
    stale: int = 0
    rounds: int = 0
    skipped: int = 0
    """Rounds in which this rank skipped."""
    group_skips: int = 0
    """Contributions skipped by any rank, summed over rounds (out of rounds x P)."""
    history: list[int] = field(default_factory=list)

    @property
    def skipped_fraction(self) -> float:
        """Fraction of this rank's rounds that sent nothing."""
        return self.skipped / self.rounds if self.rounds else 0.0

    def state_dict(self) -> dict:
        """Everything needed to resume exactly (arrays are copied)."""
        return {name: (value.copy() if isinstance(value, np.ndarray) else value)
                for name, value in vars(self).items() if name != "history"}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        for name, value in state.items():
            setattr(self, name, value.copy() if isinstance(value, np.ndarray) else value)


async def lazy_allreduce(group: Group, grad: np.ndarray, state: LazyState, *,
                         timeout: float | None = None) -> CollectiveResult:
    """Sum of the ranks' latest sent gradients; a rank sends only when its gradient moved."""
    flat = float_vector(grad)
    size = flat.size
    if state.threshold < 0 or state.max_stale < 0:
        raise InvalidArgumentError("lazy threshold and max_stale must be >= 0")
    if state.last_sent is None or state.last_sent.size != size:
        state.last_sent = np.zeros(size, flat.dtype)
        state.total = np.zeros(size, flat.dtype)
        state.stale = 0
    change = flat - state.last_sent
    skip = (state.rounds > 0 and state.stale < state.max_stale
            and float(np.dot(change, change)) <= state.threshold * float(np.dot(flat, flat)))
    own = [np.empty(0, flat.dtype)] if skip else [change]
    signature = Signature(Op.LAZY, Algorithm.RING, dtype_code(flat.dtype), ReduceOp.SUM, -1, size)

    async def body(call: Call) -> SparseResult:
        blocks = await ring_gather_blocks(call, own, size * flat.itemsize) if call.size > 1 else [own]
        skips = 0
        for rank, block in enumerate(blocks):
            delta = block[0] if rank == call.rank else np.frombuffer(block, flat.dtype)
            if delta.size == 0:
                skips += 1
            elif delta.size == size:
                state.total += delta
            else:
                raise FrameError(f"rank {rank} sent {delta.size} of {size} values", rank=call.rank)
        state.rounds += 1
        state.group_skips += skips
        if skip:
            state.skipped += 1
            state.stale += 1
        else:
            state.last_sent = flat.copy()
            state.stale = 0
        state.history.append(skips)
        if skip:  # nothing of this round's gradient was sent
            return SparseResult(None, state.total.copy(), size, np.empty(0, np.int64), np.empty(0, flat.dtype))
        return SparseResult(None, state.total.copy(), size, None, flat.copy())

    return await group.run(signature, body, timeout)
