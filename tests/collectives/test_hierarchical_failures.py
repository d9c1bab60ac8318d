"""A rank that dies inside a two-level call, host leader or not, fails every other rank with a
named error before the call's deadline (not a timeout, not a hang)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from tests.ranks import run_ranks

HOSTS = ("a", "a", "b", "b")
DEADLINE = 20.0


async def dies_between_the_levels(group, dying: int) -> str:
    """``dying`` finishes the host reduce-scatter, then dies before the inter-host step."""
    grad = np.random.default_rng(group.rank).standard_normal(4000).astype(np.float32)
    await group.reduce_gradient(grad, "gtopk", density=0.01, hierarchical=True)  # builds the sub-groups
    if group.rank == dying:
        from sparsecoll.collectives import hierarchical

        async def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        hierarchical._between_hosts = die
    try:
        await group.reduce_gradient(grad, "gtopk", density=0.01, hierarchical=True, timeout=DEADLINE)
        await group.barrier(timeout=DEADLINE)  # a rank that finished its part hears of it here
    except Exception as error:
        return type(error).__name__
    return "no error"


@pytest.mark.parametrize("dying", [0, 3], ids=["host-leader", "other-host-member"])
def test_a_rank_dying_mid_call_reaches_every_rank(dying: int) -> None:
    env = {rank: {"SPARSECOLL_HOST_ID": host} for rank, host in enumerate(HOSTS)}
    results = run_ranks(len(HOSTS), dies_between_the_levels, dying, timeout=240, per_rank_env=env,
                        expect_dead={dying})
    survivors = [result for rank, result in enumerate(results) if rank != dying]
    assert set(survivors) <= {"PeerLostError", "GroupAbortedError"}, survivors
    assert "PeerLostError" in survivors, survivors
