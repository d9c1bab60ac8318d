"""Faults on real processes: every rank raises a named error promptly, none hangs."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

import sparsecoll
from sparsecoll.errors import (
    AuthenticationError,
    CollectiveMismatchError,
    CollectiveTimeoutError,
    FrameTooLargeError,
    GroupAbortedError,
    GroupClosedError,
    PeerLostError,
    SparseCollError,
)
from sparsecoll.wire import FrameHeader, Kind, encode_header
from tests.ranks import run_ranks

DEADLINE = 4.0


async def killed_mid_collective(group) -> tuple:
    """Rank 2 SIGKILLs itself in the middle of a run of large allreduces."""
    data = np.ones(1 << 20, np.float32)
    for iteration in range(1000):
        if group.rank == 2 and iteration == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        last_success = time.monotonic()
        try:
            await group.allreduce(data, timeout=DEADLINE)
        except SparseCollError as error:
            return type(error).__name__, error.peer, time.monotonic() - last_success
    return "no error", None, 0.0


def test_killed_peer_raises_peer_lost_on_every_survivor(backend: str) -> None:
    results = run_ranks(4, killed_mid_collective, timeout=60, expect_dead={2})
    for rank in (0, 1, 3):
        name, peer, seconds = results[rank]
        assert name == "PeerLostError", results[rank]
        assert peer == 2, f"rank {rank} blamed {peer}"
        # the name already says it was noticed as a loss, not as the deadline passing; the
        # deadline bounds it (a fixed second flakes on a loaded runner)
        assert seconds < 2 * DEADLINE, results[rank]


SHORT_DEADLINE, LONG_DEADLINE = 2.0, 100.0


async def stalled_rank(group) -> tuple:
    """Rank 2 stops taking part; rank 3 has a short deadline, the others a long one."""
    await group.allreduce(np.ones(16, np.float32))
    if group.rank == 2:
        await asyncio.sleep(3 * DEADLINE)
        try:
            await group.barrier(timeout=DEADLINE)
        except SparseCollError as error:
            return type(error).__name__, error.peer, 0.0
        return "no error", None, 0.0
    timeout = SHORT_DEADLINE if group.rank == 3 else LONG_DEADLINE
    started = time.monotonic()
    try:
        await group.allreduce(np.ones(1 << 18, np.float32), timeout=timeout)
    except SparseCollError as error:
        return type(error).__name__, error.peer, time.monotonic() - started
    return "no error", None, 0.0


def test_stalled_peer_times_out_and_the_abort_reaches_everyone(backend: str) -> None:
    results = run_ranks(4, stalled_rank, timeout=60)
    for rank in (0, 1, 3):
        name, peer, seconds = results[rank]
        assert name == "CollectiveTimeoutError", results[rank]
        assert peer == 2, f"rank {rank} blamed {peer}: {results[rank]}"
        # rank 3's short deadline fires; ranks 0 and 1 hear its abort long before their own
        assert seconds < LONG_DEADLINE / 4, results[rank]
    assert results[3][2] >= SHORT_DEADLINE, results[3]  # not before its deadline
    assert results[2][0] == "CollectiveTimeoutError"


async def init_only(group) -> str:
    value, _ = await group.allreduce(np.ones(4, np.float32))
    return "connected"


@pytest.mark.parametrize("world", [2, 3])
def test_wrong_secret_fails_authentication(world: int, backend: str) -> None:
    results = run_ranks(world, init_only, timeout=60, group_kwargs={"timeout": 10},
                        per_rank_env={1: {"SPARSECOLL_SECRET": "not-the-secret"}})
    assert all(isinstance(result, SparseCollError) for result in results), results
    assert isinstance(results[1], AuthenticationError), results
    blamed = [r for r in results if isinstance(r, AuthenticationError) and r.peer == 1]
    assert blamed, f"no correct rank blamed rank 1: {results}"
    if world == 2:
        assert isinstance(results[0], AuthenticationError) and results[1].peer == 0


async def mismatched_calls(group_rank: int, world: int) -> list[str]:
    """Four separate groups, each with one kind of disagreement; every rank must notice."""
    outcomes = []
    scenarios = ["collective", "dtype", "count", "root"]
    for scenario in scenarios:
        async with await sparsecoll.init_group(name=scenario, timeout=10) as group:
            rank = group.rank
            odd = rank == world - 1
            data = np.ones(10, np.float32)
            try:
                if scenario == "collective":
                    if odd:
                        await group.broadcast(data, root=0)
                    else:
                        await group.allreduce(data)
                elif scenario == "dtype":
                    await group.allreduce(data.astype(np.float64) if odd else data)
                elif scenario == "count":
                    await group.allreduce(np.ones(11 if odd else 10, np.float32))
                else:
                    await group.broadcast(data, root=1 if odd else 0)
                await group.barrier()
                outcomes.append("no error")
            except SparseCollError as error:
                outcomes.append(type(error).__name__)
    return outcomes


def test_disagreeing_ranks_raise_collective_mismatch_everywhere(backend: str) -> None:
    results = run_ranks(4, mismatched_calls, timeout=90, group_kwargs=None)
    for rank, outcomes in enumerate(results):
        assert outcomes == ["CollectiveMismatchError"] * 4, f"rank {rank}: {outcomes}"


async def oversized_frame(group) -> str:
    """Rank 1 sends a header announcing 2**40 bytes; rank 0 must refuse it before reading."""
    if group.rank == 1:
        header = FrameHeader(Kind.DATA, 0, group.seq, 0, 1 << 40)
        await group.transport._connections[0].send([encode_header(header)])
    try:
        await group.allreduce(np.ones(8, np.float32), timeout=10)
        await group.barrier(timeout=10)
    except SparseCollError as error:
        return type(error).__name__
    return "no error"


def test_oversized_frame_is_refused_on_every_rank(backend: str) -> None:
    results = run_ranks(3, oversized_frame, timeout=60)
    assert results == ["FrameTooLargeError"] * 3


async def abort_and_close(group) -> list[str]:
    outcomes = []
    if group.rank == 0:
        await asyncio.sleep(0.3)
        group.abort("test says stop")
        try:
            await group.barrier()
        except GroupAbortedError:
            outcomes.append("GroupAbortedError")
    else:
        started = time.monotonic()
        try:
            await group.allreduce(np.ones(4, np.float32), timeout=LONG_DEADLINE)
        except GroupAbortedError as error:
            outcomes.append("GroupAbortedError")
            # the abort frame, long before this rank's own deadline (a fixed second flakes)
            outcomes.append("prompt" if time.monotonic() - started < LONG_DEADLINE / 4 else "slow")
            assert "test says stop" in str(error)
    await group.close()
    try:
        await group.allreduce(np.ones(4, np.float32))
    except GroupClosedError:
        outcomes.append("GroupClosedError")
    return outcomes


def test_abort_reaches_peers_and_closed_group_refuses_calls(backend: str) -> None:
    results = run_ranks(3, abort_and_close, timeout=60)
    assert results[0] == ["GroupAbortedError", "GroupClosedError"]
    for outcome in results[1:]:
        assert outcome == ["GroupAbortedError", "prompt", "GroupClosedError"]


async def timeout_argument(group) -> str:
    try:
        await group.allreduce(np.ones(4, np.float32), timeout=0)
    except ValueError as error:
        return type(error).__name__
    return "accepted"


def test_bad_arguments_raise_before_anything_is_sent(backend: str) -> None:
    assert run_ranks(1, timeout_argument, timeout=30) == ["InvalidArgumentError"]


async def bad_calls(group) -> list[str]:
    names = []
    for call in (lambda: group.allreduce(np.ones(3), op="xor"),
                 lambda: group.allreduce(np.ones(3, np.int32), op="mean"),
                 lambda: group.allreduce(np.ones(3, np.complex64)),
                 lambda: group.broadcast(np.ones(3), root=5),
                 lambda: group.allreduce(np.ones(3), out=np.ones(4)),
                 lambda: group.allgatherv(np.ones(3), counts=[1, 2])):
        try:
            await call()
            names.append("accepted")
        except ValueError as error:
            names.append(type(error).__name__)
    value, _ = await group.allreduce(np.ones(3))
    names.append("usable" if value.sum() == 3 * group.size else "broken")
    return names


def test_invalid_arguments_leave_the_group_usable(backend: str) -> None:
    for names in run_ranks(2, bad_calls, timeout=30):
        assert names == ["InvalidArgumentError"] * 6 + ["usable"]


def sync_facade(rank: int, world: int) -> tuple:
    group = sparsecoll.init_sync_group(timeout=20)
    with group:
        value, stats = group.allreduce(np.full(1000, rank + 1.0), op="mean")
        gathered, _ = group.allgather(np.array([rank]))
        group.barrier()
    try:
        group.barrier()
    except GroupClosedError:
        closed = True
    return float(value[0]), gathered.ravel().tolist(), stats.bytes_sent > 0, closed


def test_sync_facade_runs_collectives_from_plain_code(backend: str) -> None:
    results = run_ranks(3, sync_facade, timeout=60, group_kwargs=None)
    for value, gathered, counted, closed in results:
        assert value == 2.0 and gathered == [0, 1, 2] and counted and closed


def test_errors_carry_rank_and_peer() -> None:
    error = PeerLostError("gone", rank=3, peer=1)
    assert (error.rank, error.peer) == (3, 1)
    assert "rank 3" in str(error) and "peer 1" in str(error)
    assert isinstance(CollectiveTimeoutError("t"), TimeoutError)
    assert issubclass(FrameTooLargeError, sparsecoll.errors.FrameError)
    assert issubclass(CollectiveMismatchError, SparseCollError)
