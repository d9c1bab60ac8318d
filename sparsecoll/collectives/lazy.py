"""Lazy aggregation in the spirit of LAG / LAQ (Chen et al. 2018, 2019): skip what changed little.

Dense (:func:`lazy_allreduce`): every rank keeps the sum of the ranks' last *sent* gradients.
At each round a rank sends the change since its own last send, or nothing when that change is
small: ``|g - g_sent|^2 <= threshold * |g|^2`` (and it has not skipped ``max_stale`` rounds in
a row). The changes travel around a ring (a skipping rank contributes an empty block but still
forwards the others'), and every rank adds them, in rank order, to its running sum, which
therefore stays identical on all ranks. The result is the sum of the latest sent gradients:
stale for the ranks that skipped, exact for the others. With ``quantize_bits`` the change goes
at b bits (LAQ) and ``g_sent`` advances by the decoded change, so the rounding error of one
round is part of the next round's change instead of accumulating.

Sparse allgather (``sparse_allgather(..., lazy=state)``) applies the same rule to a rank's
selection and keeps every rank's last sent (indices, values); see :func:`sparse_skip`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from sparsecoll import kernels
from sparsecoll.call import Call, CollectiveResult
from sparsecoll.collectives.quantized_ring import (
    check_bits,
    decode_quantized,
    encode_quantized,
    quantized_bytes,
    stream_seed,
)
from sparsecoll.collectives.sparse_common import SparseResult, float_vector, ring_gather_blocks
from sparsecoll.errors import FrameError, InvalidArgumentError
from sparsecoll.wire import Algorithm, Op, ReduceOp, Signature, dtype_code

if TYPE_CHECKING:
    from sparsecoll.group import Group

Contribution = tuple[np.ndarray, np.ndarray]


@dataclass
class LazyState:
    """The memory of one lazily reduced tensor; keep one per gradient (or bucket) and reuse it."""

    threshold: float = 0.1
    max_stale: int = 10
    last_sent: np.ndarray | None = None
    total: np.ndarray | None = None
    contributions: list[Contribution] | None = None
    """Sparse allgather: every rank's last sent (indices, values), the same on all ranks."""
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

    def validate(self) -> None:
        """InvalidArgumentError for a rule that cannot work."""
        if self.threshold < 0 or self.max_stale < 0:
            raise InvalidArgumentError("lazy threshold and max_stale must be >= 0")

    def wants_skip(self, change_squared: float, norm_squared: float) -> bool:
        """The LAG rule: skip a change small against the gradient, unless stale too long."""
        return (self.rounds > 0 and self.stale < self.max_stale
                and change_squared <= self.threshold * norm_squared)

    def record(self, skipped: bool, group_skips: int) -> None:
        """Count one finished round."""
        self.rounds += 1
        self.group_skips += group_skips
        self.history.append(group_skips)
        if skipped:
            self.skipped += 1
            self.stale += 1
        else:
            self.stale = 0

    def state_dict(self) -> dict:
        """Everything needed to resume exactly (arrays are copied)."""
        return {name: _copied(value) for name, value in vars(self).items() if name != "history"}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        for name, value in state.items():
            setattr(self, name, _copied(value))


def _copied(value: object) -> object:
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, list):
        return [tuple(part.copy() for part in item) for item in value]
    return value


def _squared(values: np.ndarray) -> float:
    wide = values.astype(np.float64, copy=False)
    return float(np.dot(wide, wide))


def sparse_skip(state: LazyState, rank: int, world: int, indices: np.ndarray, values: np.ndarray) -> bool:
    """Whether this rank may skip: its selection moved little since the one it last sent.

    The rule compares sparse vectors (this round's selection against the last sent one), so it
    costs O(k), not O(d). A rank with no sent contribution on record always sends.
    """
    if state.contributions is None or len(state.contributions) != world:
        return False
    last_indices, last_values = state.contributions[rank]
    _, change = kernels.merge_sorted(indices, values, last_indices, -last_values)
    return state.wants_skip(_squared(np.asarray(change)), _squared(values))


def stale_contribution(state: LazyState, peer: int, rank: int) -> Contribution:
    """``peer``'s last sent (indices, values), which it asked every rank to reuse."""
    if state.contributions is None or len(state.contributions) <= peer:
        raise FrameError(f"rank {peer} asked to reuse a contribution this rank never received",
                         rank=rank, peer=peer)
    return state.contributions[peer]


def keep_contributions(state: LazyState, parts: list[Contribution]) -> None:
    """Remember this round's (fresh or reused) contributions as the stale copies of the next."""
    state.contributions = [(np.array(indices, np.int64), np.array(values)) for indices, values in parts]


async def lazy_allreduce(group: Group, grad: np.ndarray, state: LazyState, *, quantize_bits: int | None = None,
                         seed: int = 0, timeout: float | None = None) -> CollectiveResult:
    """Sum of the ranks' latest sent gradients; a rank sends only when its gradient moved.

    For error feedback, a rank that sends reports its new ``g_sent`` as sent (its whole
    contribution to the sum, after rounding); one that skips reports nothing sent, as the
    round's gradient did not reach the sum.
    """
    flat = float_vector(grad)
    size = flat.size
    state.validate()
    bits = quantize_bits or 0
    if bits:
        check_bits(bits)
    if state.last_sent is None or state.last_sent.size != size:
        state.last_sent = np.zeros(size, flat.dtype)
        state.total = np.zeros(size, flat.dtype)
        state.stale = 0
    change = flat - state.last_sent
    skip = state.wants_skip(_squared(change), _squared(flat))
    block_bytes = quantized_bytes(size, bits) if bits else size * flat.itemsize
    signature = Signature(Op.LAZY, Algorithm.RING, dtype_code(flat.dtype), ReduceOp.SUM, -1, size, 0, bits)

    async def body(call: Call) -> SparseResult:
        own: list[np.ndarray] = [np.empty(0, np.uint8)]
        sent_change = change
        if not skip and bits:
            own = encode_quantized(change, bits, stream_seed(seed, call.seq, call.rank, state.rounds))
            sent_change = decode_quantized(own, size, bits, flat.dtype)
        elif not skip:
            own = [change]
        blocks = await ring_gather_blocks(call, own, block_bytes) if call.size > 1 else [own]
        skips = 0
        for rank, block in enumerate(blocks):
            if rank == call.rank:
                delta = None if skip else sent_change
            elif len(block) == 0:
                delta = None
            elif len(block) != block_bytes:
                raise FrameError(f"rank {rank} sent {len(block)} bytes, not {block_bytes}", rank=call.rank)
            else:
                delta = decode_quantized(block, size, bits, flat.dtype) if bits else np.frombuffer(block, flat.dtype)
            if delta is None:
                skips += 1
            else:
                state.total += delta
        if not skip:
            state.last_sent = state.last_sent + sent_change if bits else flat.copy()
        state.record(skip, skips)
        if skip:  # nothing of this round's gradient was sent
            return SparseResult(None, state.total.copy(), size, np.empty(0, np.int64), np.empty(0, flat.dtype))
        return SparseResult(None, state.total.copy(), size, None, state.last_sent.copy())

    return await group.run(signature, body, timeout)
