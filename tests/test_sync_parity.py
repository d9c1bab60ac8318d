"""SyncGroup offers every public call of Group with the same signature, blocking; and a blocking
call made on the group's own loop thread raises LoopThreadError instead of deadlocking."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect

import numpy as np
import pytest
import torch.distributed as dist

import sparsecoll
from sparsecoll.errors import LoopThreadError
from sparsecoll.sync import NOT_MIRRORED, SyncGroup, group_coroutines, init_sync_group
from tests.ranks import run_ranks

PLAIN_CALLS = ("isend", "irecv", "new_group", "abort")
"""Group's public calls that are not coroutines but belong to the API users call."""


def _parameters(function) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def test_every_public_coroutine_of_group_has_a_blocking_twin_with_its_signature() -> None:
    names = group_coroutines()
    assert {"allreduce", "reduce_gradient", "gtopk", "cltk", "sparse_allgather", "sketch_allreduce",
            "split", "send", "recv", "collective", "barrier"} <= set(names)
    for name in names:
        if name in NOT_MIRRORED:
            continue
        twin = getattr(SyncGroup, name, None)
        assert twin is not None, f"SyncGroup lacks {name}"
        assert not inspect.iscoroutinefunction(twin), name
        assert _parameters(twin) == _parameters(getattr(sparsecoll.Group, name)), name
        if name not in ("split", "close"):
            assert inspect.signature(twin).return_annotation == \
                inspect.signature(getattr(sparsecoll.Group, name)).return_annotation, name
    for name in PLAIN_CALLS:
        assert _parameters(getattr(SyncGroup, name)) == _parameters(getattr(sparsecoll.Group, name)), name
    public = {name for name, member in vars(sparsecoll.Group).items()
              if not name.startswith("_") and callable(member)}
    assert public - set(names) - set(PLAIN_CALLS) <= {"poison", "check_usable", "learn_hosts"}, "a new public call of Group"


def _on_loop(sync: SyncGroup, coroutine) -> object:
    """Run ``coroutine`` on the group's loop, failing (not hanging) if the loop deadlocks."""
    future = asyncio.run_coroutine_threadsafe(coroutine, sync._loop)
    try:
        return future.result(timeout=20)
    except concurrent.futures.TimeoutError:
        pytest.fail("the facade deadlocked on its own loop thread")  # the loop thread stays stuck


def test_a_blocking_call_on_the_loop_thread_raises_and_leaves_the_group_usable() -> None:
    sync = init_sync_group(store=dist.HashStore(), rank=0, world_size=1, timeout=10)

    async def calls_the_facade():
        return sync.allreduce(np.ones(4, np.float32))

    with pytest.raises(LoopThreadError, match="allreduce.*own event-loop thread"):
        _on_loop(sync, calls_the_facade())

    async def runs_through_the_facade():
        return sync.run(asyncio.sleep(0))

    with pytest.raises(LoopThreadError, match="run"):
        _on_loop(sync, runs_through_the_facade())
    failures = []

    def callback() -> None:
        try:
            sync.barrier()
        except LoopThreadError as error:
            failures.append(error)

    _on_loop(sync, _call_soon(callback))  # a callback on the loop, as a codec's would be
    assert len(failures) == 1 and isinstance(failures[0], RuntimeError)
    total, _ = sync.allreduce(np.arange(4, dtype=np.float32))  # still usable
    assert total.tolist() == [0, 1, 2, 3] and sync.error is None
    sync.close()


async def _call_soon(callback) -> None:
    asyncio.get_running_loop().call_soon(callback)
    await asyncio.sleep(0.01)


def sync_rank(rank: int, world: int) -> dict:
    """Every kind of call through the facade on one rank of a real job."""
    with init_sync_group(timeout=60) as group:
        grad = np.random.default_rng(rank).standard_normal(4096).astype(np.float32)
        everything = sum(np.random.default_rng(r).standard_normal(4096).astype(np.float32) for r in range(world))
        out = {}
        dense, _ = group.reduce_gradient(grad, "dense")
        out["dense_ok"] = bool(np.allclose(dense.dense(), everything, atol=1e-5))
        for name in ("gtopk", "cltk", "sparse_allgather", "sketch_allreduce"):
            result, stats = getattr(group, name)(grad, k=40)
            out[name] = (result.dense().tobytes(), stats.bytes_sent)
        child = group.split(rank % 2)
        out["child"] = (type(child).__name__, child.size, float(child.allreduce(np.ones(1, np.float32))[0][0]))
        sent = group.isend(np.full(3, rank, np.int64), (rank + 1) % world, tag=5)
        received = group.irecv((rank - 1) % world, tag=5).result(timeout=30)
        sent.result(timeout=30)
        out["ring"] = int(received.value[0])
        out["bytes"] = group.total_stats.bytes_sent
        return out


def test_sparse_calls_split_and_p2p_work_blocking_on_real_ranks() -> None:
    results = run_ranks(2, sync_rank, group_kwargs=None, timeout=120)
    for rank, out in enumerate(results):
        assert out["dense_ok"]
        assert out["child"] == ("SyncGroup", 1, 1.0)
        assert out["ring"] == (rank - 1) % 2
        assert out["bytes"] > 0
    for name in ("gtopk", "cltk", "sparse_allgather", "sketch_allreduce"):
        assert results[0][name][0] == results[1][name][0], name  # the same result on every rank
        assert results[0][name][1] > 0
