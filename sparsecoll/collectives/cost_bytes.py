"""The byte side of the cost model: what a rank sends per call, flat and in two levels.

Every number is the mean over the ranks of what :class:`~sparsecoll.call.CommStats` counts
(``bytes_sent``: payload plus a :data:`~sparsecoll.wire.HEADER_SIZE` header a frame), for
float values of ``itemsize`` bytes and no quantization, following the collectives' own frames:
the ring cuts chunks into :data:`~sparsecoll.collectives.dense.SEGMENT_BYTES` frames, recursive
doubling folds the ranks above a power of two in and out, gTop-k's hosts return a bit mask to
their folded neighbour. Exact for dense, allgather, gTop-k, sketch and CLT-k; Ok-Topk is its
paper's bound (3k(P-1)/P pairs; what it sends depends on the data). The two-level numbers follow
:mod:`sparsecoll.collectives.hierarchical` on hosts of equal size, with each rank's top-k spread
evenly over the shards (what step 1 of allgather and gTop-k sends depends on where the top-k
lies; step 2, the bytes between hosts, does not).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from sparsecoll.collectives.dense import SEGMENT_BYTES, SMALL_ALLREDUCE_BYTES, chunk_bounds
from sparsecoll.collectives.doubling import DoublingPlan
from sparsecoll.collectives.sketch import default_columns
from sparsecoll.errors import InvalidArgumentError
from sparsecoll.wire import HEADER_SIZE, index_dtype, sparse_payload_size

SKETCH_ROWS = 5
"""Rows of sketch_allreduce's count sketch (its default)."""
TWO_LEVEL_ALGORITHMS = ("dense", "allgather", "gtopk", "cltk")
"""What :mod:`sparsecoll.collectives.hierarchical` runs in two levels."""
BYTE_FORMULAS = ("dense", "allgather", "gtopk", "cltk", "sketch", "oktopk")
"""What :func:`bytes_sent` has a formula for: every builtin algorithm."""


def _frames(nbytes: int) -> int:
    """Frames a pipelined ring step or chain cuts ``nbytes`` into."""
    return max(1, -(-nbytes // SEGMENT_BYTES))


def ring_bytes(ranks: int, count: int, itemsize: int = 4) -> float:
    """Ring allreduce: in each phase every chunk is sent by P-1 ranks, in segment frames."""
    if ranks == 1:
        return 0.0
    bounds = chunk_bounds(count, ranks)
    chunks = [(high - low) * itemsize for low, high in zip(bounds[:-1], bounds[1:])]
    return 2 * (ranks - 1) * sum(chunk + HEADER_SIZE * _frames(chunk) for chunk in chunks) / ranks


def _doubling_messages(ranks: int) -> float:
    """Mean messages a rank sends in recursive doubling: the folded send one, their hosts the
    rounds and the result back, the others the rounds."""
    plan = DoublingPlan(0, ranks)
    extra, rounds = plan.extra, plan.rounds
    return (extra * 1 + extra * (rounds + 1) + (ranks - 2 * extra) * rounds) / ranks


def dense_bytes(ranks: int, count: int, itemsize: int = 4) -> float:
    """Group.allreduce: recursive doubling up to SMALL_ALLREDUCE_BYTES (or fewer values than
    ranks), else the ring."""
    if ranks == 1:
        return 0.0
    if count * itemsize <= SMALL_ALLREDUCE_BYTES or count < ranks:
        return _doubling_messages(ranks) * (count * itemsize + HEADER_SIZE)
    return ring_bytes(ranks, count, itemsize)


def pair_frame(k: int, size: int, itemsize: int = 4, bits: int | None = None) -> int:
    """One frame of k (index, value) pairs of a ``size``-element gradient (values quantized to
    ``bits`` when given)."""
    return HEADER_SIZE + sparse_payload_size(k, size, np.dtype(f"f{itemsize}"), bits)


def bytes_sent(algorithm: str, ranks: int, size: int, k: int, itemsize: int = 4, bits: int | None = None) -> float:
    """Mean bytes a rank sends in one flat call of ``algorithm`` (see the module docstring);
    ``bits`` (allgather and gTop-k): their pairs' values quantized."""
    if ranks == 1:
        return 0.0
    if algorithm == "dense":
        return dense_bytes(ranks, size, itemsize)
    if algorithm == "allgather":  # every block forwarded P-1 times around the ring
        return (ranks - 1) * pair_frame(k, size, itemsize, bits)
    if algorithm == "gtopk":
        plan = DoublingPlan(0, ranks)
        mask = plan.extra * (HEADER_SIZE + (k + 7) // 8) / ranks
        return _doubling_messages(ranks) * pair_frame(k, size, itemsize, bits) + mask
    if algorithm == "cltk":  # the leader's indices down a chain (P-1 senders), then a ring of k values
        indices = k * index_dtype(size).itemsize
        return (ranks - 1) * (indices + HEADER_SIZE * _frames(indices)) / ranks + ring_bytes(ranks, k, itemsize)
    if algorithm == "sketch":
        return ring_bytes(ranks, SKETCH_ROWS * default_columns(k), 4) + ring_bytes(ranks, min(size, 4 * k), itemsize)
    if algorithm == "oktopk":  # the paper's bound: split, balance (at most), ring; plus the counts
        frames = 2 * (ranks - 1) + 1
        plan = DoublingPlan(0, ranks)
        counts = (plan.rounds + 2 * (plan.extra > 0)) * (8 * ranks + HEADER_SIZE)
        return 3 * (ranks - 1) / ranks * (index_dtype(size).itemsize + itemsize) * k \
            + frames * (8 + HEADER_SIZE) + counts
    raise InvalidArgumentError(f"no byte formula for {algorithm!r}")


BREAK_EVEN_ALGORITHMS = ("allgather", "gtopk")
"""What :func:`sparse_break_even` prices: the algorithms whose pairs can outweigh a dense
allreduce at a warm-up's densities (their bytes grow with k times P - 1, or log P)."""


@functools.lru_cache(maxsize=256)
def sparse_break_even(algorithm: str, ranks: int, size: int, itemsize: int = 4, dense_itemsize: int | None = None,
                      bits: int | None = None) -> float | None:
    """The largest density at which one flat call of ``algorithm`` sends no more bytes a rank
    than the dense allreduce of the same ``size`` values (sent as ``dense_itemsize``-byte
    values, default ``itemsize``): above it the sparse call is the dearer one. None for an
    algorithm outside :data:`BREAK_EVEN_ALGORITHMS`. Allgather's pairs cross P - 1 links, so
    with float32 values it breaks even at 1/P (0.25 at P = 4, 0.03 at P = 32), half that
    against a float16 dense allreduce."""
    if algorithm not in BREAK_EVEN_ALGORITHMS:
        return None
    if ranks == 1 or size == 0:
        return 1.0
    dense = dense_bytes(ranks, size, dense_itemsize or itemsize)
    low, high = 0, size  # bytes grow with k: the largest k within the dense bytes
    while low < high:
        middle = (low + high + 1) // 2
        if bytes_sent(algorithm, ranks, size, middle, itemsize, bits) <= dense:
            low = middle
        else:
            high = middle - 1
    return low / size


@dataclass(frozen=True)
class Shards:
    """The two-level split of a gradient over hosts of ``per_host`` ranks: shard j's length
    and its share k_j of the k entries (both split as :func:`chunk_bounds` splits them)."""

    lengths: tuple[int, ...]
    counts: tuple[int, ...]

    @classmethod
    def of(cls, per_host: int, size: int, k: int) -> Shards:
        bounds, shares = chunk_bounds(size, per_host), chunk_bounds(k, per_host)
        return cls(tuple(b - a for a, b in zip(bounds[:-1], bounds[1:])),
                   tuple(b - a for a, b in zip(shares[:-1], shares[1:])))


@dataclass(frozen=True)
class TwoLevelBytes:
    """Mean bytes a rank sends in one two-level call: inside its host (steps 1 and 3) and to
    other hosts (step 2)."""

    intra_host: float
    inter_host: float

    @property
    def total(self) -> float:
        return self.intra_host + self.inter_host


def two_level_result_count(algorithm: str, hosts: int, length: int, count: int) -> int:
    """Entries of a shard's result that step 3 copies inside the host: k_j, or for allgather
    the union of the hosts' k_j (at most H·k_j: disjoint, as the flat formula assumes)."""
    return min(length, hosts * count) if algorithm == "allgather" else count


def two_level_bytes(algorithm: str, hosts: int, per_host: int, size: int, k: int,
                    itemsize: int = 4) -> TwoLevelBytes:
    """Mean bytes a rank sends in one two-level call on ``hosts`` hosts of ``per_host`` ranks.

    1. Reduce-scatter inside the host: each rank sends every shard it does not own to its
       owner (dense and CLT-k the whole shard; allgather and gTop-k its top-k pairs in it).
    2. Between hosts: the flat algorithm on ``hosts`` ranks over the rank's own shard.
    3. Allgather inside the host: each owner sends its shard's result to the L-1 others.

    With one host or one rank a host the call is the flat algorithm (as at run time).
    """
    check_two_level(algorithm, hosts, per_host)
    if hosts == 1:
        return TwoLevelBytes(bytes_sent(algorithm, per_host, size, k, itemsize), 0.0)
    if per_host == 1:
        return TwoLevelBytes(0.0, bytes_sent(algorithm, hosts, size, k, itemsize))
    shards = Shards.of(per_host, size, k)
    others = (per_host - 1) / per_host  # every shard goes from L-1 ranks to its owner, and back
    scatter = gather = inter = 0.0
    for length, count in zip(shards.lengths, shards.counts):
        if algorithm in ("dense", "cltk"):
            scatter += others * (HEADER_SIZE + length * itemsize)
        else:
            scatter += others * pair_frame(count, length, itemsize)
        if algorithm == "dense":
            gather += others * (HEADER_SIZE + length * itemsize)
        else:
            result = two_level_result_count(algorithm, hosts, length, count)
            gather += others * (pair_frame(result, length, itemsize) + (result + 7) // 8)
        inter += bytes_sent(algorithm, hosts, length, max(count, 1), itemsize) / per_host
    return TwoLevelBytes(scatter + gather, inter)


def check_two_level(algorithm: str, hosts: int, per_host: int) -> None:
    """InvalidArgumentError unless ``algorithm`` runs in two levels on hosts x per_host >= 1."""
    if algorithm not in TWO_LEVEL_ALGORITHMS:
        raise InvalidArgumentError(f"no two-level {algorithm!r}; choose from {list(TWO_LEVEL_ALGORITHMS)}")
    if hosts < 1 or per_host < 1:
        raise InvalidArgumentError(f"need hosts >= 1 and ranks per host >= 1, not {hosts} and {per_host}")
