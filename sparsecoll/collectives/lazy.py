"""Lazy aggregation: LAG (Chen, Giannakis, Sun, Yin 2018) and LAQ (Sun, Chen, Giannakis, Yang 2019).

The rule (LAG-WK, eq. (12a); LAQ eq. (7a)). Rank m holds the gradient it last uploaded, ``g_sent``
(LAQ: its quantized gradient ``Q_sent``). At round k, with the gradient ``g = grad L_m(theta^k)``
of a loss that the server sums over the M ranks and steps by ``theta^{k+1} = theta^k - alpha *
sum_m g_sent_m``, rank m skips its upload when

    ||g - g_sent||^2 <= (1 / (alpha^2 M^2)) sum_{d=1..D} xi_d ||theta^{k+1-d} - theta^{k-d}||^2

and LAQ, whose left side is ``||Q_new - Q_sent||^2``, adds ``3 (||eps||^2 + ||eps_sent||^2)``,
the squared quantization errors of the new and of the last uploaded gradient. The right side
shrinks with the parameter steps, so near an optimum every rank uploads again unless its gradient
truly stopped changing; a rank also uploads after ``max_stale`` skips in a row (LAQ's clock
``t-bar``). Defaults are the papers' experiments: D = 10, xi_d = 1/D; ``max_stale`` = 100.

The caller feeds the right side: :meth:`LazyState.record_parameter_step` after every update with
``||theta^{k+1} - theta^k||^2`` and the step size ``alpha`` applied to the sum this collective
returns (:class:`~sparsecoll.torch.SparseCollOptimizer` does it with ``alpha = lr / M``, as it
steps by the mean). Before any step is recorded the right side is zero and every rank uploads.

``threshold=`` (a number) selects instead the relative rule ``||g - g_sent||^2 <= threshold *
||g||^2`` that this module used before. It is kept only for callers that cannot report
parameter steps; it does not tighten near an optimum where the ranks' own gradients do not vanish
(heterogeneous data), so it stalls there (issue 22: a gap of 1.35e-3 where LAG reaches 1e-8).

Dense (:func:`lazy_allreduce`): every rank keeps the sum of the ranks' last sent gradients, in
float64. The ranks first agree a P-entry upload map (a P-byte allreduce); a round in which every
rank skips costs only that. Otherwise the round takes the cheaper of two exact schemes: the
uploaders' changes since their last upload travel the ring (a skipper sends and forwards
nothing of its own) and every rank adds them in rank order to its running sum; or a dense
allreduce of every rank's sent gradient (a skipper's stale one) replaces the running sum, which
also clears its rounding drift. So a rank never sends more than the map plus a dense ring
allreduce, where the allgather this replaced sent (P-1)·d values in rounds without skips. With
``quantize_bits`` the change goes at b bits (LAQ): on LAQ's deterministic grid with an inf-norm
radius (``quantizer="grid"``, :mod:`sparsecoll.compress.grid`, the default) or stochastically
rounded with a scale per 256 values (``quantizer="stochastic"``); ``g_sent`` advances by the
decoded change, so a round's rounding error is part of the next round's innovation. At b bits
u changes cost u·b/32 of d floats, so LAQ forwards changes while u < 64/b.

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
from sparsecoll.collectives.dense import SMALL_ALLREDUCE_BYTES, recursive_doubling_allreduce, ring_allreduce
from sparsecoll.collectives.doubling import DoublingPlan
from sparsecoll.collectives.sparse_common import SparseResult, float_vector
from sparsecoll.compress.grid import grid_bytes, grid_decode, grid_parts, grid_quantize
from sparsecoll.errors import FrameError, InvalidArgumentError
from sparsecoll.wire import HEADER_SIZE, Algorithm, Op, ReduceOp, Signature, dtype_code

if TYPE_CHECKING:
    from sparsecoll.group import Group

Contribution = tuple[np.ndarray, np.ndarray]
QUANTIZERS = ("grid", "stochastic")
GRID_SIGNATURE = 1 << 8
"""Added to the signature's bit width when the grid quantizer is used, so ranks cannot mix them."""
MAP_TAGS = 0
CHANGE_TAGS = 1 << 10
"""Tags of the upload map's allreduce and of the round's changes (or sent sum) after it."""


@dataclass
class LazyState:
    """The memory of one lazily reduced tensor; keep one per gradient (or bucket) and reuse it.

    Hyperparameters: ``memory`` (D), ``weights`` (xi_1..xi_D; None means 1/D each),
    ``max_stale`` (forced upload after that many skips), ``quantizer`` (LAQ's "grid" or
    "stochastic") and ``threshold`` (None: LAG's rule; a number: the relative rule).
    """

    threshold: float | None = None
    max_stale: int = 100
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
    memory: int = 10
    weights: tuple[float, ...] | None = None
    quantizer: str = "grid"
    step_size: float | None = None
    """alpha: the step the caller takes along the sum this collective returns."""
    parameter_steps: list[float] = field(default_factory=list)
    """||theta^{k+1-d} - theta^{k-d}||^2 for d = 1..D, the most recent first."""
    sent_error: float = 0.0
    """LAQ: ||eps_sent||^2, the squared quantization error of the last uploaded gradient."""

    @property
    def skipped_fraction(self) -> float:
        """Fraction of this rank's rounds that sent nothing."""
        return self.skipped / self.rounds if self.rounds else 0.0

    def fresh(self) -> LazyState:
        """A new state with this one's hyperparameters and no memory (one per bucket)."""
        return LazyState(threshold=self.threshold, max_stale=self.max_stale, memory=self.memory,
                         weights=self.weights, quantizer=self.quantizer)

    def validate(self) -> None:
        """InvalidArgumentError for a rule that cannot work."""
        if (self.threshold is not None and self.threshold < 0) or self.max_stale < 0:
            raise InvalidArgumentError("lazy threshold and max_stale must be >= 0")
        if self.memory < 1:
            raise InvalidArgumentError(f"lazy memory D must be >= 1, not {self.memory}")
        if self.weights is not None and (len(self.weights) != self.memory or min(self.weights) < 0):
            raise InvalidArgumentError(f"lazy weights must be D = {self.memory} non-negative numbers, "
                                       f"not {self.weights}")
        if self.quantizer not in QUANTIZERS:
            raise InvalidArgumentError(f"lazy quantizer must be one of {QUANTIZERS}, not {self.quantizer!r}")

    def record_parameter_step(self, squared_norm: float, step_size: float) -> None:
        """Feed the rule: after an update, ``||theta^{k+1} - theta^k||^2`` and the step size alpha."""
        if not (squared_norm >= 0 and np.isfinite(squared_norm)):
            raise InvalidArgumentError(f"a parameter step's squared norm must be finite and >= 0, "
                                       f"not {squared_norm}")
        if not step_size > 0:
            raise InvalidArgumentError(f"the step size must be positive, not {step_size}")
        self.step_size = float(step_size)
        self.parameter_steps.insert(0, float(squared_norm))
        del self.parameter_steps[self.memory:]

    def lag_bound(self, world: int) -> float:
        """The rule's right side: (1 / (alpha^2 M^2)) sum_d xi_d ||theta^{k+1-d} - theta^{k-d}||^2."""
        if self.step_size is None or not self.parameter_steps:
            return 0.0
        weights = self.weights if self.weights is not None else (1.0 / self.memory,) * self.memory
        recent = sum(weight * step for weight, step in zip(weights, self.parameter_steps))
        return recent / (self.step_size * world) ** 2

    def wants_skip(self, change_squared: float, norm_squared: float, world: int,
                   quantization_error: float = 0.0) -> bool:
        """Whether to skip this round: the change is within the rule's bound, and not stale too long.

        ``quantization_error`` is LAQ's ``||eps||^2`` of this round's quantized gradient (the
        last uploaded one's is kept in ``sent_error``).
        """
        if self.rounds == 0 or self.stale >= self.max_stale:
            return False
        if self.threshold is not None:
            return change_squared <= self.threshold * norm_squared
        bound = self.lag_bound(world)
        if quantization_error or self.sent_error:
            bound += 3.0 * (quantization_error + self.sent_error)
        return change_squared <= bound

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
        return [tuple(part.copy() for part in item) if isinstance(item, tuple) else item for item in value]
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
    return state.wants_skip(_squared(np.asarray(change)), _squared(values), world)


def stale_contribution(state: LazyState, peer: int, rank: int) -> Contribution:
    """``peer``'s last sent (indices, values), which it asked every rank to reuse."""
    if state.contributions is None or len(state.contributions) <= peer:
        raise FrameError(f"rank {peer} asked to reuse a contribution this rank never received",
                         rank=rank, peer=peer)
    return state.contributions[peer]


def keep_contributions(state: LazyState, parts: list[Contribution]) -> None:
    """Remember this round's (fresh or reused) contributions as the stale copies of the next."""
    state.contributions = [(np.array(indices, np.int64), np.array(values)) for indices, values in parts]


def skip_map_bytes(rank: int, world: int) -> int:
    """Bytes ``rank`` sends to agree the skip map: a P-byte recursive-doubling allreduce."""
    if world == 1:
        return 0
    plan = DoublingPlan(rank, world)
    frames = 1 if plan.folded else plan.rounds + (1 if plan.host else 0)
    return frames * (HEADER_SIZE + world)


def forwards_changes(uploaders: int, block_bytes: int, size: int, itemsize: int) -> bool:
    """Whether a round sends the uploaders' changes along the ring (each forwarded P-1 hops)
    rather than ring-allreducing every rank's sent gradient: the one that moves fewer bytes,
    ``uploaders`` blocks against the two passes of d values of the ring (ties go to the ring)."""
    return uploaders * block_bytes < 2 * size * itemsize


async def _agree_uploads(call: Call, uploading: bool) -> np.ndarray:
    """The P-entry upload map (1: uploads this round), the same on every rank."""
    flags = np.zeros(call.size, np.uint8)
    flags[call.rank] = uploading
    if call.size > 1:
        await recursive_doubling_allreduce(call, flags, np.maximum, MAP_TAGS)
    return flags


async def _forward_present(call: Call, own: list[np.ndarray], present: np.ndarray, limit: int) -> list:
    """Every uploader's block, in rank order (None for the others), along the ring: block b
    goes b -> b+1 -> ... -> b+P-1, and a rank sends or receives only blocks that exist."""
    size, rank = call.size, call.rank
    right, left = (rank + 1) % size, (rank - 1) % size
    blocks: list = [None] * size
    blocks[rank] = own if present[rank] else None
    for step in range(size - 1):
        outgoing, incoming = (rank - step) % size, (rank - step - 1) % size
        tag = CHANGE_TAGS + step
        if present[outgoing] and present[incoming]:
            buffers = blocks[outgoing]
            blocks[incoming] = await call.exchange(right, buffers if isinstance(buffers, list) else [buffers],
                                                   left, None, tag, limit)
        elif present[outgoing]:
            buffers = blocks[outgoing]
            await call.send(right, tag, *(buffers if isinstance(buffers, list) else [buffers]))
        elif present[incoming]:
            blocks[incoming] = await call.recv(left, tag, None, limit)
    call.stats.rounds += size - 1
    return blocks


async def _sum_sent(call: Call, sent: np.ndarray) -> np.ndarray:
    """Sum over the ranks of their sent gradients, by the group's dense allreduce (bit-identical)."""
    total = sent.copy()
    if call.size > 1:
        if total.nbytes <= SMALL_ALLREDUCE_BYTES or total.size < call.size:
            await recursive_doubling_allreduce(call, total, np.add, CHANGE_TAGS)
        else:
            await ring_allreduce(call, total, np.add, CHANGE_TAGS)
    return total


async def lazy_allreduce(group: Group, grad: np.ndarray, state: LazyState, *, quantize_bits: int | None = None,
                         seed: int = 0, timeout: float | None = None) -> CollectiveResult:
    """Sum of the ranks' latest sent gradients; a rank sends only when the rule asks it to.

    Each round, on every rank:

    1. form the upload candidate: the change ``g - g_sent`` (LAQ: quantized, ``Q_new - Q_sent``,
       and its quantization error ``eps = Q_new - g``);
    2. skip or upload by the rule (module docstring);
    3. agree the upload map (P bytes, a recursive-doubling allreduce); with u uploaders:
       u = 0: nothing more is sent, the sum stands;
       few uploaders (``forwards_changes``: u blocks cost less than the ring's 2d values, so
       u = 1 unquantized, u < 64/b at b bits): the uploaders' changes travel the ring, each
       forwarded P-1 hops, and every rank adds them in rank order to its float64 running sum;
       otherwise: a dense allreduce of every rank's new ``g_sent`` (a skipper's stale one), whose
       result replaces the running sum, so float rounding never accumulates across such rounds;
    4. on upload, advance ``g_sent`` (LAQ: ``Q_sent = Q_new``, ``||eps_sent||^2 = ||eps||^2``).

    Per rank: the map, plus at most what a dense ring allreduce sends. For error feedback, a
    rank that sends reports its new ``g_sent`` as sent (its whole contribution to the sum, after
    rounding); one that skips reports nothing sent, as the round's gradient did not reach the sum.
    """
    flat = float_vector(grad)
    size = flat.size
    state.validate()
    bits = quantize_bits or 0
    grid = bool(bits) and state.quantizer == "grid"
    if bits:
        check_bits(bits)
    if state.last_sent is None or state.last_sent.size != size:
        state.last_sent = np.zeros(size, flat.dtype)
        state.total = np.zeros(size, np.float64)
        state.stale = 0
        state.sent_error = 0.0
    if state.total.dtype != np.float64:  # a state saved before the running sum was float64
        state.total = state.total.astype(np.float64)
    if grid:
        block_bytes = grid_bytes(size, bits)
    else:
        block_bytes = quantized_bytes(size, bits) if bits else size * flat.itemsize
    signature = Signature(Op.LAZY, Algorithm.RING, dtype_code(flat.dtype), ReduceOp.SUM, -1, size, 0,
                          bits + (GRID_SIGNATURE if grid else 0))

    def decode(block: memoryview | list[np.ndarray]) -> np.ndarray:
        if grid:
            radius, packed = grid_parts(block, size, bits) if not isinstance(block, list) else block
            return grid_decode(radius, packed, size, bits, flat.dtype)
        return decode_quantized(block, size, bits, flat.dtype) if bits else np.frombuffer(block, flat.dtype)

    async def body(call: Call) -> SparseResult:
        # 1. the candidate change and, quantized, its rounding error
        own: list[np.ndarray] = [flat - state.last_sent]
        change = own[0]
        error = 0.0
        if bits:
            if grid:
                own = list(grid_quantize(change, bits))
            else:
                own = encode_quantized(change, bits, stream_seed(seed, call.seq, call.rank, state.rounds))
            change = decode(own)
            error = _squared(state.last_sent + change - flat)
        # 2. the rule
        skip = state.wants_skip(_squared(change), _squared(flat), call.size, error)
        # 3. the map, then the changes or the sum of sent gradients
        uploads = await _agree_uploads(call, not skip)
        uploaders = int(uploads.sum())
        sent = state.last_sent if skip else (state.last_sent + change if bits else flat)
        if uploaders and forwards_changes(uploaders, block_bytes, size, flat.itemsize):
            blocks = await _forward_present(call, own, uploads, block_bytes) if call.size > 1 else [own]
            for rank, block in enumerate(blocks):
                if not uploads[rank]:
                    continue
                if rank == call.rank:
                    state.total += change
                elif len(block) != block_bytes:
                    raise FrameError(f"rank {rank} sent {len(block)} bytes, not {block_bytes}", rank=call.rank)
                else:
                    state.total += decode(block)
        elif uploaders:
            state.total = (await _sum_sent(call, sent)).astype(np.float64)
        # 4. what this rank's sum now holds of it
        if not skip:
            state.last_sent = sent.copy() if sent is flat else sent
            state.sent_error = error
        state.record(skip, call.size - uploaders)
        total = state.total.astype(flat.dtype)
        if skip:  # nothing of this round's gradient was sent
            return SparseResult(None, total, size, np.empty(0, np.int64), np.empty(0, flat.dtype))
        return SparseResult(None, total, size, None, state.last_sent.copy())

    return await group.run(signature, body, timeout)
