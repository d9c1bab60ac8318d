"""Sub-groups over the parent's connections: own numbering and tag space, concurrent use."""

from __future__ import annotations

import asyncio

import numpy as np

from tests.ranks import run_ranks


async def concurrent_children(group) -> dict:
    rank = group.rank
    halves = await group.split(color=rank % 2, key=-rank)  # reversed order inside each half
    pair = group.new_group([3, 1])
    outcome = {"half": (halves.rank, halves.size, halves.members), "pair": None if pair is None else
               (pair.rank, pair.size, pair.members)}
    parent_sums, half_sums = [], []
    for step in range(20):
        parent_value, half_value = await asyncio.gather(
            group.allreduce(np.full(5000, step + rank, np.float64)),
            halves.allreduce(np.full(3, rank, np.int64)))
        parent_sums.append(float(parent_value[0][0]))
        half_sums.append(int(half_value[0][0]))
    outcome["parent"] = parent_sums
    outcome["half"] += (half_sums[0], len(set(half_sums)))
    # the same tag in parent and child does not mix: each message lands in its own group
    if pair is not None:
        other = 1 - pair.rank
        sent = asyncio.gather(group.send(np.array([100 + rank]), pair.members[other], tag=7),
                              pair.send(np.array([200 + rank]), other, tag=7))
        from_child = await pair.recv(other, tag=7)
        from_parent = await group.recv(pair.members[other], tag=7)
        await sent
        outcome["tags"] = (int(from_parent.value[0]), int(from_child.value[0]))
    nobody = await group.split(color=None if rank == 0 else 0)
    outcome["none"] = nobody is None if rank == 0 else nobody.size
    await halves.close()
    value, _ = await group.allreduce(np.ones(2))
    outcome["parent_after_child_close"] = float(value[0])
    return outcome


def test_split_and_new_group_run_beside_the_parent() -> None:
    results = run_ranks(4, concurrent_children, timeout=90)
    for rank, outcome in enumerate(results):
        half_rank, half_size, members, first_sum, distinct = outcome["half"]
        same_color = [r for r in range(4) if r % 2 == rank % 2]
        assert members == tuple(sorted(same_color, reverse=True))
        assert (half_rank, half_size) == (members.index(rank), 2)
        assert first_sum == sum(same_color) and distinct == 1
        assert outcome["parent"] == [float(sum(step + r for r in range(4))) for step in range(20)]
        assert outcome["parent_after_child_close"] == 4.0
        if rank in (1, 3):
            assert outcome["pair"] == ([3, 1].index(rank), 2, (3, 1))
            other = 4 - rank
            assert outcome["tags"] == (100 + other, 200 + other)
        else:
            assert outcome["pair"] is None
        assert outcome["none"] is True if rank == 0 else outcome["none"] == 3
