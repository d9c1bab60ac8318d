"""Ok-Topk against a numpy reference at every P from 1 to 8, on real ranks.

One spawn of 8 ranks runs every case on the sub-groups of ranks 0..P-1. Every rank draws every
rank's gradient from the same seed, so each computes the reference itself:

- without a state every call estimates, so each rank selects its exact top-k (nonzero) and the
  result must be the entries of S = the sum of those selections that lie above one cut: all
  kept magnitudes at least every dropped one, at least min(k, nnz S) of them, values S's;
- error feedback: a rank's sent set is its selection inside the result, and the ranks' sent
  values sum to the result; the result is bit-identical on every rank;
- bytes: the split pairs are this rank's selection outside its region, the ring's are the
  total less the right neighbour's block, and ``bytes_sent`` is exactly those pairs, the
  balance pieces, the headers and the counts' allreduce; with reused thresholds the pairs stay
  within the paper's 3k(P-1)/P (6k(P-1)/P numbers), k the run's largest actual count.

Cases: zero-gradient ranks, every top-k entry in one region, d < P, k = 0, d = 0 and 1,
float16/32/64 and bfloat16, 4-bit values. A rank whose state disagrees (it estimates while
the others reuse) fails every rank with CollectiveMismatchError, and so does a NaN on one
rank (with its own error); refused arguments leave the group usable.
"""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
import pytest

from sparsecoll.collectives.dense import chunk_bounds
from sparsecoll.collectives.doubling import DoublingPlan
from sparsecoll.collectives.oktopk_state import OkTopkState
from sparsecoll.errors import InvalidArgumentError, SparseCollError
from sparsecoll.wire import HEADER_SIZE
from tests.ranks import run_ranks

MAX_WORLD = 8
TOLERANCE = {np.float64: 1e-12, np.float32: 1e-5, np.float16: 2e-2, ml_dtypes.bfloat16: 5e-2}
CASES = [  # name, d, k, dtype, kind
    ("random", 240, 9, np.float32, "random"),
    ("float64", 97, 7, np.float64, "random"),
    ("float16", 64, 5, np.float16, "random"),
    ("bfloat16", 80, 6, ml_dtypes.bfloat16, "random"),
    ("odd-ranks-zero", 120, 6, np.float32, "odd-zero"),
    ("all-zero", 50, 5, np.float32, "zero"),
    ("one-region", 2000, 12, np.float32, "clustered"),
    ("d<P", 3, 2, np.float32, "random"),
    ("k=0", 40, 0, np.float32, "random"),
    ("d=1", 1, 1, np.float64, "random"),
    ("d=0", 0, 0, np.float32, "random"),
    ("k=d", 9, 9, np.float32, "random"),
]
REUSE_STEPS = 4
REUSE_SIZE, REUSE_K = 4096, 64


def top_k(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest |values| (ties by lower index), zeros dropped, indices ascending."""
    order = np.sort(np.lexsort((np.arange(values.size), -np.abs(values.astype(np.float64))))[:k])
    order = order[values[order] != 0]
    return order, values[order]


def gradients(world: int, d: int, dtype, kind: str, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    grads = [rng.standard_normal(d).astype(dtype) for _ in range(world)]
    if kind == "zero":
        return [np.zeros(d, dtype) for _ in range(world)]
    if kind == "odd-zero":
        return [np.zeros(d, dtype) if rank % 2 else grad for rank, grad in enumerate(grads)]
    if kind == "clustered":  # every rank's top-k sits in the first histogram bin
        for rank, grad in enumerate(grads):
            grad *= 0.01
            grad[:12] = 10.0 + rank + np.arange(12)
    return grads


def dense(indices, values, d: int) -> np.ndarray:
    out = np.zeros(d)
    np.add.at(out, np.asarray(indices, np.int64), np.asarray(values, np.float64))
    return out


def doubling_bytes(rank: int, world: int, nbytes: int) -> tuple[int, int]:
    """(frames, bytes) one rank sends in a recursive-doubling allreduce of ``nbytes``."""
    plan = DoublingPlan(rank, world)
    frames = 1 if plan.folded else plan.rounds + (1 if plan.host else 0)
    return frames, frames * (HEADER_SIZE + nbytes)


def balance_frames(rank: int, counts: list[int]) -> int:
    """Pieces this owner sends when its kept entries are re-split into near-equal blocks."""
    starts = np.concatenate([[0], np.cumsum(counts)])
    blocks = chunk_bounds(int(starts[-1]), len(counts))
    return sum(1 for block in range(len(counts)) if block != rank
               and min(starts[rank + 1], blocks[block + 1]) > max(starts[rank], blocks[block]))


def check_steady_bytes(result, stats, rank: int, world: int, itemsize: int, cut: bool) -> list[str]:
    """A reuse call moves the sparse pairs, their headers and counts, and one counts allreduce."""
    failures = []
    pairs = sum(result.pairs_sent.values())
    total = sum(result.kept_counts)
    right = (rank + 1) % world
    blocks = chunk_bounds(total, world)
    if result.pairs_sent["gather"] != (total - (blocks[right + 1] - blocks[right]) if world > 1 else 0):
        failures.append(f"ring pairs {result.pairs_sent} for counts {result.kept_counts}")
    frames = 2 * (world - 1) + balance_frames(rank, result.kept_counts) if world > 1 else 0
    control_frames, control = doubling_bytes(rank, world, 8 * world)
    expected = pairs * (4 + itemsize) + frames * (HEADER_SIZE + 8) + control
    if not cut and world > 1 and stats.bytes_sent != expected:
        failures.append(f"bytes {stats.bytes_sent} != {expected} ({pairs} pairs, {frames} frames)")
    largest = max(result.local_count, total)
    if world > 1 and pairs > 3 * largest * (world - 1) / world:
        failures.append(f"{pairs} pairs above the paper's 3k(P-1)/P with k={largest}")
    return failures


async def sent_and_digests(sub, result, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's sent entries as dense rows, and every rank's digest of its result (one allgather)."""
    digest = zlib.crc32(np.asarray(result.indices, np.int64).tobytes() + np.asarray(result.values).tobytes())
    row = np.append(dense(result.sent_indices, result.sent_values, d), float(digest))
    gathered, _ = await sub.allgather(row)
    table = np.asarray(gathered).reshape(sub.size, d + 1)
    return table[:, :d], table[:, d]


async def check_call(sub, grads, k: int, result, stats, dtype, where: str, bits=None) -> list[str]:
    """Every check of one estimating call (see the module docstring)."""
    failures = []
    world, rank, d = sub.size, sub.rank, grads[0].size
    tolerance = TOLERANCE[dtype] * world * (64 if bits else 1)
    selections = [top_k(g, k) for g in grads]
    summed = sum((dense(*s, d) for s in selections), np.zeros(d))
    indices = np.asarray(result.indices, np.int64)
    scale = max(1.0, float(np.abs(summed).max(initial=0)))
    exact = not bits  # quantized split values: the sums hold their rounding, checked through sent
    if exact and not np.allclose(dense(indices, result.values, d), dense(indices, summed[indices], d),
                                 rtol=tolerance, atol=tolerance * scale):
        failures.append(f"values are not the sums {where}")
    dropped = np.ones(d, bool)
    dropped[indices] = False
    nonzero = np.count_nonzero(summed)
    if exact and indices.size and dropped.any() and \
            np.abs(result.values.astype(np.float64)).min() < np.abs(summed[dropped]).max() * (1 - tolerance):
        failures.append(f"a dropped sum outweighs a kept one {where}")
    if not min(k, nonzero) <= indices.size <= nonzero:
        failures.append(f"{indices.size} kept of {nonzero} nonzero sums, k={k} {where}")
    if not np.array_equal(np.asarray(result.sent_indices, np.int64),
                          np.intersect1d(selections[rank][0], indices)):
        failures.append(f"sent set is not the selection inside the result {where}")
    sent, digests = await sent_and_digests(sub, result, d)
    if not np.allclose(sent.sum(axis=0), dense(indices, result.values, d), rtol=tolerance, atol=tolerance * scale):
        failures.append(f"sum of sent != result {where}")
    if len(set(digests.tolist())) != 1:
        failures.append(f"ranks hold different results {where}")
    own = slice(int(result.boundaries[rank]), int(result.boundaries[rank + 1]))
    outside = int(np.count_nonzero((selections[rank][0] < own.start) | (selections[rank][0] >= own.stop)))
    if world > 1 and result.pairs_sent["split"] != outside:
        failures.append(f"split sent {result.pairs_sent['split']} pairs, {outside} lie outside {own} {where}")
    return failures


async def oktopk_rank(group) -> list[str]:
    failures = []
    for world in range(1, group.size + 1):
        sub = group.new_group(range(world))
        if sub is None:
            continue
        for number, (name, d, k, dtype, kind) in enumerate(CASES):
            if (number + world) % 2 and name != "random":  # each case at every other P, to save time
                continue
            grads = gradients(world, d, dtype, kind, seed=100 * world + number)
            where = f"P={world} {name}"
            result, stats = await sub.reduce_gradient(grads[sub.rank], "oktopk", k=k)
            failures += await check_call(sub, grads, k, result, stats, dtype, where)
            if kind == "clustered" and world > 1 and result.kept_counts[0] != sum(result.kept_counts):
                failures.append(f"clustered top-k spread over regions {result.kept_counts} {where}")
        if world in (1, 3, 8):
            grads = gradients(world, 256, np.float32, "random", seed=world)
            result, stats = await sub.reduce_gradient(grads[sub.rank], "oktopk", k=11, quantize_bits=4)
            failures += await check_call(sub, grads, 11, result, stats, np.float32, f"P={world} 4-bit", bits=4)
        state = OkTopkState(interval=3)
        rng = np.random.default_rng(world)
        common = rng.standard_t(3, REUSE_SIZE)
        for step in range(REUSE_STEPS):
            noise = np.random.default_rng([world, step, sub.rank]).standard_normal(REUSE_SIZE)
            grad = (common + 0.3 * noise).astype(np.float32)
            cuts = state.global_cuts
            result, stats = await sub.reduce_gradient(grad, "oktopk", k=REUSE_K, state=state, step=step)
            where = f"P={world} reuse step {step}"
            if result.estimated != (step % 3 == 0):
                failures.append(f"estimated={result.estimated} {where}")
            if result.local_count > REUSE_K or sum(result.kept_counts) > 1.25 * REUSE_K:
                failures.append(f"counts {result.local_count}, {result.kept_counts} above k or 5k/4 {where}")
            if not result.estimated:
                failures += [f"{text} {where}" for text in
                             check_steady_bytes(result, stats, sub.rank, world, 4, state.global_cuts != cuts)]
            sent, digests = await sent_and_digests(sub, result, REUSE_SIZE)
            if not np.allclose(sent.sum(axis=0), dense(result.indices, result.values, REUSE_SIZE),
                               rtol=1e-5, atol=1e-4):
                failures.append(f"sum of sent != result {where}")
            if len(set(digests.tolist())) != 1:
                failures.append(f"ranks hold different results {where}")
        await sub.close()
    return failures


@pytest.mark.slow
def test_oktopk_against_a_reference_at_every_world_size() -> None:
    results = run_ranks(MAX_WORLD, oktopk_rank, timeout=280)
    errors = [result for result in results if isinstance(result, SparseCollError)]
    assert not errors, errors
    failures = [f"rank {rank}: {failure}" for rank, result in enumerate(results) for failure in result]
    assert not failures, "\n".join(failures[:30])


async def disagreeing_rank(group, fault: str) -> str:
    """Refused arguments first (they leave the group usable), then the fault on every rank."""
    grad = np.random.default_rng(group.rank).standard_normal(300).astype(np.float32)
    refused = []
    for options in ({"state": "thresholds"}, {"interval": 0}, {"quantize_bits": 3}, {"k": 301},
                    {"lazy": object()}):
        try:
            await group.reduce_gradient(grad, "oktopk", **{"k": 5, **options})
        except (InvalidArgumentError, TypeError):
            refused.append(True)
    assert len(refused) == 5 and group.error is None
    state = OkTopkState()
    await group.reduce_gradient(grad, "oktopk", k=5, state=state)
    if fault == "fresh-state" and group.rank == 1:
        state = OkTopkState()  # rank 1 estimates again while the others reuse
    if fault == "nan" and group.rank == 2:
        grad[7] = np.nan
    try:
        await group.reduce_gradient(grad, "oktopk", k=5, state=state, timeout=60)
    except SparseCollError as error:
        return type(error).__name__
    return "no error"


@pytest.mark.parametrize("fault", ["fresh-state", "nan"])
def test_a_disagreeing_rank_fails_every_rank(fault: str) -> None:
    results = run_ranks(3, disagreeing_rank, fault, timeout=120)
    assert all(result != "no error" for result in results), results
    if fault == "fresh-state":
        assert results == ["CollectiveMismatchError"] * 3, results
    else:
        assert results[2] == "InvalidArgumentError", results
