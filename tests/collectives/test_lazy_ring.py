"""Lazy dense aggregation at dense cost, on real ranks: an upload map, then the uploaders' changes
along the ring or one dense allreduce of the sent gradients, whichever moves fewer bytes.

Skips are scripted with the relative rule at threshold 0 (LAG) or 1e-3 (LAQ, whose re-quantized
unchanged gradient moves by a rounding error only): a rank skips exactly when its gradient did not
change. Bytes are checked against the formulas, results bit for bit across ranks, against the
exact sum of the sent gradients and against the running float32 sum the allgather scheme kept.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparsecoll.collectives.dense import chunk_bounds
from sparsecoll.collectives.lazy import LazyState, forwards_changes, skip_map_bytes
from sparsecoll.compress.grid import grid_bytes
from sparsecoll.wire import HEADER_SIZE
from tests.ranks import run_ranks

WORLD, D, DRIFT_D, DRIFT_ROUNDS = 4, 20_000, 2_000, 60
CHANGING = [{0, 1, 2, 3}, {0, 1}, set(), {2}, {0, 1, 2, 3}, {3}]
"""Who changes its gradient each round: 0%, 50%, 100%, 75% and 0% skipped, then 75% again."""
ONE_THREAD = {"NUMBA_NUM_THREADS": "1"}


def scripted(rank: int, step: int, size: int = D) -> np.ndarray:
    """Rank ``rank``'s gradient at ``step``: new whenever the script says it changes."""
    version = sum(1 for earlier in CHANGING[: step + 1] if rank in earlier)
    return np.random.default_rng(100 * rank + version).standard_normal(size).astype(np.float32)


async def scripted_rounds(group, bits: int | None) -> dict:
    state = LazyState(threshold=1e-3 if bits else 0.0)
    rounds = []
    for step in range(len(CHANGING)):
        result, stats = await group.reduce_gradient(scripted(group.rank, step), "dense", lazy=state,
                                                    quantize_bits=bits)
        rounds.append((result.values.tobytes(), stats.bytes_sent, state.last_sent.copy()))
    return {"rounds": rounds, "history": state.history}


async def drift(group) -> dict:
    """Many rounds in which only rank 0 uploads (its changes travel the ring): the running sum's
    drift from the exact sum of sent gradients."""
    state = LazyState(threshold=0.0, max_stale=10 ** 6)
    rng = np.random.default_rng(group.rank)
    grad = rng.standard_normal(DRIFT_D).astype(np.float32) * np.float32(1000.0)
    sent, first_total = [], None
    for _ in range(DRIFT_ROUNDS):
        if group.rank == 0:
            grad = grad + rng.standard_normal(DRIFT_D).astype(np.float32)
        await group.reduce_gradient(grad, "dense", lazy=state)
        first_total = state.total.copy() if first_total is None else first_total
        if group.rank == 0:
            sent.append(state.last_sent.copy())
    return {"total": state.total.copy(), "first_total": first_total, "last_sent": state.last_sent.copy(),
            "sent": sent, "history": state.history}


async def everything(group) -> dict:
    return {"lag": await scripted_rounds(group, None), "laq": await scripted_rounds(group, 8),
            "drift": await drift(group)}


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return run_ranks(WORLD, everything, timeout=240, env=ONE_THREAD)


def ring_bytes(rank: int, count: int, itemsize: int) -> int:
    """A dense ring allreduce of ``count`` values (one frame a chunk): 2(P-1) chunks a rank."""
    bounds = chunk_bounds(count, WORLD)
    chunk = [(bounds[i + 1] - bounds[i]) * itemsize for i in range(WORLD)]
    scatter = sum(HEADER_SIZE + chunk[(rank - step) % WORLD] for step in range(WORLD - 1))
    gather = sum(HEADER_SIZE + chunk[(rank - step + 1) % WORLD] for step in range(WORLD - 1))
    return scatter + gather


def expected_bytes(rank: int, uploading: set, block_bytes: int) -> int:
    """The map; then nothing, the uploaders' blocks this rank forwards, or the dense ring."""
    if not uploading:
        return skip_map_bytes(rank, WORLD)
    if forwards_changes(len(uploading), block_bytes, D, 4):
        forwarded = [(rank - hop) % WORLD for hop in range(WORLD - 1)]
        return skip_map_bytes(rank, WORLD) + sum(HEADER_SIZE + block_bytes for r in forwarded if r in uploading)
    return skip_map_bytes(rank, WORLD) + ring_bytes(rank, D, 4)


@pytest.mark.parametrize("scheme, block_bytes", [("lag", 4 * D), ("laq", grid_bytes(D, 8))])
def test_bytes_follow_the_formula_at_every_skip_fraction(runs: list[dict], scheme: str, block_bytes: int) -> None:
    history = [WORLD - len(uploading) for uploading in CHANGING]
    history[0] = 0
    for rank, out in enumerate(runs):
        assert out[scheme]["history"] == history, out[scheme]["history"]
        for step, uploading in enumerate(CHANGING):
            sent = out[scheme]["rounds"][step][1]
            assert sent == expected_bytes(rank, uploading, block_bytes), (rank, step, sent)
    if scheme == "lag":  # 0% and 50% skipped: the dense ring; 100%: the map; 75%: rank 2's change
        dense = ring_bytes(3, D, 4)
        assert [runs[3]["lag"]["rounds"][step][1] - skip_map_bytes(3, WORLD) for step in range(4)] \
            == [dense, dense, 0, HEADER_SIZE + 4 * D]
        assert skip_map_bytes(3, WORLD) == 2 * (HEADER_SIZE + WORLD)


@pytest.mark.parametrize("scheme, block_bytes", [("lag", 4 * D), ("laq", grid_bytes(D, 8))])
def test_results_are_bit_identical_and_the_sum_of_what_was_sent(runs: list[dict], scheme: str,
                                                                 block_bytes: int) -> None:
    """Within float32 rounding of the exact sum of sent gradients, and of the allgather scheme's
    float32 running sum of changes; each bound is the rounding of the arithmetic that made it."""
    eps = float(np.finfo(np.float32).eps)
    old_total = np.zeros(D, np.float32)
    old_bound = np.zeros(D)  # half an ulp of each change and of each partial sum
    new_bound = np.zeros(D)  # a ring round: the float32 ring sum; a forward: each change's rounding
    previous = [np.zeros(D, np.float32) for _ in range(WORLD)]
    for step, uploading in enumerate(CHANGING):
        values = runs[0][scheme]["rounds"][step][0]
        assert all(out[scheme]["rounds"][step][0] == values for out in runs), f"ranks differ at {step}"
        result = np.frombuffer(values, np.float32).astype(np.float64)
        sent = [out[scheme]["rounds"][step][2] for out in runs]
        exact = np.sum([part.astype(np.float64) for part in sent], axis=0)
        magnitude = np.sum([np.abs(part.astype(np.float64)) for part in sent], axis=0)
        ring = step == 0 or (uploading and not forwards_changes(len(uploading), block_bytes, D, 4))
        if ring:
            new_bound = (WORLD - 1) * eps * magnitude
        for rank in range(WORLD):
            if not np.array_equal(sent[rank], previous[rank]):
                change = sent[rank] - previous[rank]
                old_total += change
                old_bound += eps / 2 * (np.abs(change) + np.abs(old_total))
                if not ring:
                    new_bound += eps / 2 * (np.abs(change) + np.abs(sent[rank]))
                previous[rank] = sent[rank]
        cast = eps / 2 * np.abs(exact) + 1e-12 * magnitude
        assert np.all(np.abs(result - exact) <= new_bound + cast), step
        assert np.all(np.abs(result - old_total) <= new_bound + cast + old_bound), step


def test_the_float64_running_sum_does_not_drift(runs: list[dict]) -> None:
    """Round 0 (all upload) sums the sent gradients by the float32 ring: one rounding. Then 59
    rounds of rank 0's changes go into the float64 running sum: its error grows only by each
    change's own float32 rounding (half an ulp of the change), where the allgather scheme's
    float32 running sum also rounds every partial sum (half an ulp of the total, each round)."""
    assert all(out["drift"]["history"][1:] == [WORLD - 1] * (DRIFT_ROUNDS - 1) for out in runs)
    exact = np.sum([out["drift"]["last_sent"].astype(np.float64) for out in runs], axis=0)
    first_exact = exact - runs[0]["drift"]["last_sent"] + runs[0]["drift"]["sent"][0].astype(np.float64)
    scale = float(np.abs(exact).max())
    first_error = [out["drift"]["first_total"] - first_exact for out in runs]
    assert max(float(np.abs(error).max()) for error in first_error) <= WORLD * np.finfo(np.float32).eps * scale
    new_drift = max(float(np.abs(out["drift"]["total"] - exact - error).max())
                    for out, error in zip(runs, first_error)) / scale
    old_total = np.sum([out["drift"]["last_sent"] for out in runs[1:]], axis=0, dtype=np.float32)
    previous = np.zeros(DRIFT_D, np.float32)
    change_rounding = np.zeros(DRIFT_D)
    for round_index, sent in enumerate(runs[0]["drift"]["sent"]):
        old_total += sent - previous
        if round_index:
            change_rounding += np.finfo(np.float32).eps / 2 * np.abs(sent - previous)
        previous = sent
    old_drift = float(np.abs(old_total - exact).max()) / scale
    print(f"running-sum drift after {DRIFT_ROUNDS} rounds: float64 {new_drift:.2e}, float32 {old_drift:.2e}")
    assert new_drift <= float(change_rounding.max()) / scale + 1e-13 < old_drift
