"""The sparse collectives against numpy references at every P from 1 to 8, on real ranks.

One spawn of 8 ranks runs every case: for each P it builds the sub-group of ranks 0..P-1 and
runs many small random trials in sequence (every rank draws every rank's gradient from the same
seed, so each can compute the reference itself). Each case is checked with its values:

- gTop-k: the result and every rank's sent set against a numpy model of recursive doubling that
  tracks which of a rank's entries survived *every* merge (an entry cut in one round whose index
  comes back from a later partner is not in the sum); and, independently of that model, the sum
  of what the ranks sent equals the result (nothing counted twice, nothing lost).
- sparse allgather: the sum of every rank's exact top-k.
- CLT-k: every rank's values at the step leader's top-k indices, summed.
- sketch: at most k indices, and its values are the exact sums there.

Sizes include d = 0, 1 and odd sizes, k = 0, 1, small and d, and float16/32/64 values.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparsecoll.collectives.doubling import DoublingPlan
from sparsecoll.errors import SparseCollError
from tests.ranks import run_ranks

MAX_WORLD = 8
TRIALS = 9
OTHERS_EVERY = 3
"""allgather, CLT-k and sketch run every third trial: gTop-k's merges need the most cases."""
DTYPES = (np.float64, np.float32, np.float16)
TOLERANCE = {np.float64: 1e-12, np.float32: 1e-5, np.float16: 2e-2}


def top_k(indices: np.ndarray, values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest |values| (ties by lower index), indices ascending."""
    order = np.lexsort((indices, -np.abs(values.astype(np.float64))))[:k]
    chosen = np.sort(order)
    return indices[chosen], values[chosen]


def merged(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int):
    """Top k of the sum of two sparse vectors."""
    union = np.union1d(a[0], b[0])
    values = np.zeros(union.size, a[1].dtype)
    values[np.searchsorted(union, a[0])] += a[1]
    values[np.searchsorted(union, b[0])] += b[1]
    return top_k(union, values, k)


def gtopk_reference(grads: list[np.ndarray], k: int):
    """Recursive doubling in numpy: the result and, per rank, the local indices it sent."""
    world = len(grads)
    local = [top_k(np.arange(g.size), g, k) for g in grads]
    alive = [np.ones(part[0].size, bool) for part in local]
    plans = [DoublingPlan(rank, world) for rank in range(world)]
    holders = {}  # virtual rank -> (current sparse vector, real ranks whose entries it carries)
    for rank, plan in enumerate(plans):
        if plan.folded:
            continue
        members = [rank - 1, rank] if plan.host else [rank]
        current = merged(local[rank - 1], local[rank], k) if plan.host else local[rank]
        holders[plan.virtual] = (current, members)

    def prune(members: list[int], kept: np.ndarray) -> None:
        for member in members:
            alive[member] &= np.isin(local[member][0], kept)

    for members in [members for _, members in holders.values() if len(members) == 2]:
        prune(members, holders[plans[members[1]].virtual][0][0])
    for round_index in range(plans[0].rounds):
        step = {}
        for virtual, (current, members) in holders.items():
            partner_current, partner_members = holders[virtual ^ (1 << round_index)]
            step[virtual] = (merged(current, partner_current, k), members + partner_members)
        holders = step
        for current, members in holders.values():
            prune(members, current[0])
    result = holders[0][0]
    return result, [local[rank][0][alive[rank]] for rank in range(world)]


def cases(rank: int):
    """(name, d, k, dtype, seed) of every trial, the same list on every rank."""
    rng = np.random.default_rng(7)
    for trial in range(TRIALS):
        d = int(rng.choice([0, 1, 2, 7, 12, 12, 16, 33]))
        k = int(rng.choice([0, 1, 3, d])) if d else 0
        k = min(k, d)
        yield trial, d, k, DTYPES[trial % len(DTYPES)], int(rng.integers(1 << 30))
    yield TRIALS, 4, 1, np.float64, ADVERSARIAL


ADVERSARIAL = -1
"""Rank 1's entry is cut in its first merge, and its index comes back from the other ranks."""


def gradients(world: int, d: int, dtype, seed: int) -> list[np.ndarray]:
    """Correlated random gradients: shared big coordinates make indices drop and come back."""
    if seed == ADVERSARIAL:  # e.g. P=3: {0: 5} beats rank 1's {1: 4}; rank 2's {1: 12} wins the round
        grads = [np.array([0.0, 10.0 + rank, 0.0, 0.0], dtype) for rank in range(world)]
        grads[0] = np.array([5.0, 0.0, 0.0, 0.0], dtype)
        if world > 1:
            grads[1] = np.array([0.0, 4.0, 0.0, 0.0], dtype)
        return grads
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(d) * 2
    return [(common + rng.standard_normal(d) * 1.5).astype(dtype) for _ in range(world)]


def dense(indices: np.ndarray, values: np.ndarray, d: int) -> np.ndarray:
    out = np.zeros(d)
    np.add.at(out, np.asarray(indices, np.int64), np.asarray(values, np.float64))
    return out


async def invariants_rank(group) -> list[str]:
    """Every failed check, as text (an empty list when all hold)."""
    failures = []
    for world in range(1, group.size + 1):
        sub = group.new_group(range(world))
        if sub is None:
            continue
        for trial, d, k, dtype, seed in cases(sub.rank):
            grads = gradients(world, d, dtype, seed)
            mine = grads[sub.rank]
            where = f"P={world} trial={trial} d={d} k={k} {np.dtype(dtype).name}"
            tolerance = TOLERANCE[dtype] * max(1.0, world)
            result, _ = await sub.gtopk(mine, k=k, exact=True)
            reference, sent_sets = gtopk_reference(grads, k)
            if not np.array_equal(np.asarray(result.indices, np.int64), reference[0]):
                failures.append(f"gtopk indices {where}: {result.indices} != {reference[0]}")
            elif not np.allclose(result.values.astype(np.float64), reference[1].astype(np.float64),
                                 rtol=tolerance, atol=tolerance):
                failures.append(f"gtopk values {where}")
            if not np.array_equal(np.asarray(result.sent_indices, np.int64), sent_sets[sub.rank]):
                failures.append(f"gtopk sent set {where}: {result.sent_indices} != {sent_sets[sub.rank]}")
            gathered, _ = await sub.allgather(dense(result.sent_indices, result.sent_values, d))
            total_sent = np.asarray(gathered).reshape(world, d).sum(axis=0)
            if not np.allclose(total_sent, dense(result.indices, result.values, d), rtol=tolerance,
                               atol=tolerance * max(1.0, float(np.abs(total_sent).max(initial=0)))):
                failures.append(f"gtopk sum of sent != result {where}")

            if trial % OTHERS_EVERY:
                continue
            result, _ = await sub.sparse_allgather(mine, k=k)
            expected = sum(dense(*top_k(np.arange(d), g, k), d) for g in grads) if grads else np.zeros(d)
            if not np.allclose(dense(result.indices, result.values, d), expected, rtol=tolerance,
                               atol=tolerance):
                failures.append(f"allgather {where}")

            step = trial
            result, _ = await sub.cltk(mine, k=k, step=step)
            leader_indices = top_k(np.arange(d), grads[step % world], k)[0]
            expected_values = sum(g[leader_indices].astype(np.float64) for g in grads)
            if not (np.array_equal(np.sort(np.asarray(result.indices, np.int64)), leader_indices)
                    and np.allclose(dense(result.indices, result.values, d),
                                    dense(leader_indices, expected_values, d), rtol=tolerance, atol=tolerance)):
                failures.append(f"cltk {where}: {result.indices} vs {leader_indices}")

            if d:
                result, _ = await sub.sketch_allreduce(mine, k=max(k, 1), seed=seed)
                indices = np.asarray(result.indices, np.int64)
                exact = sum(g.astype(np.float64) for g in grads)[indices]
                if not (len(indices) <= max(k, 1) and np.allclose(np.asarray(result.values, np.float64), exact, rtol=tolerance,
                                        atol=tolerance)):
                    failures.append(f"sketch {where}")
        await sub.close()
    return failures


@pytest.mark.slow
def test_gtopk_sent_set_matches_a_survival_reference() -> None:
    """Also allgather, CLT-k and sketch: one spawn, every P from 1 to 8 (see the module doc)."""
    results = run_ranks(MAX_WORLD, invariants_rank, timeout=240)
    errors = [result for result in results if isinstance(result, SparseCollError)]
    assert not errors, errors
    failures = [f"rank {rank}: {failure}" for rank, result in enumerate(results) for failure in result]
    assert not failures, "\n".join(failures[:30])


def test_reference_tracks_survival_through_merges() -> None:
    """The reference itself: an entry cut in the fold is not sent, though its index returns."""
    grads = [np.array([5.0, 0.0, 0.1]), np.array([0.0, 4.0, 0.2]), np.array([0.0, 0.0, 3.0]),
             np.array([1.0, 0.0, 0.0])]
    result, sent = gtopk_reference(grads, 1)
    # round 0: {0,1} keeps index 0 (5.0), {2,3} keeps index 2 (3.0), cutting rank 3's index 0;
    # round 1 keeps index 0 (5.0): its index is back, but the sum lacks rank 3's 1.0
    assert result[0].tolist() == [0] and result[1].tolist() == [5.0]
    assert [s.tolist() for s in sent] == [[0], [], [], []]
