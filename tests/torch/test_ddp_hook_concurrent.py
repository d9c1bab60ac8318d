"""The DDP comm hook reduces its buckets concurrently, each on its own lane: bucket 0's reduction
waits (in a registered collective, on real ranks) until bucket 1's has started, which a hook that
runs buckets one after another never lets happen; and replicas stay identical with gtopk."""

from __future__ import annotations

import asyncio

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import sparsecoll
from sparsecoll.torch import CommHookState, comm_hook, init_group
from tests.ranks import run_ranks

ENTERED: dict[int, set[int]] = {}
"""Per iteration, the seeds (one per bucket) of the reductions that have started on this rank."""
SECOND_STARTED: dict[int, asyncio.Event] = {}
WAITED_OUT: list[int] = []
WAIT_S = 20.0


@sparsecoll.register_collective("test-waits-for-a-second-bucket", replace=True)
async def waits_for_a_second_bucket(group, grad, *, density=None, k=None, step=0, seed=0, timeout=None, **options):
    """A dense allreduce that first waits until a second bucket of the same iteration has started."""
    entered = ENTERED.setdefault(step, set())
    second = SECOND_STARTED.setdefault(step, asyncio.Event())
    entered.add(seed)
    if len(entered) >= 2:
        second.set()
    try:
        await asyncio.wait_for(second.wait(), WAIT_S)
    except asyncio.TimeoutError:
        WAITED_OUT.append(step)
    total, stats = await group.allreduce(np.ascontiguousarray(grad), timeout=timeout)
    return total, stats


def model_with_two_buckets() -> torch.nn.Module:
    torch.manual_seed(0)  # the 600x600 weight fills DDP's first (1 MiB) bucket: two buckets
    return torch.nn.Sequential(torch.nn.Linear(16, 600), torch.nn.Tanh(), torch.nn.Linear(600, 600), torch.nn.Tanh(),
                               torch.nn.Linear(600, 3))


def train(model, optimizer, rank: int, steps: int) -> None:
    for step in range(steps):
        generator = torch.Generator().manual_seed(100 * step + rank)
        features, labels = torch.randn(4, 16, generator=generator), torch.randint(0, 3, (4,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(features), labels).backward()
        optimizer.step()


def concurrent_buckets(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    outcome = {}
    try:
        with init_group(timeout=60, kernel_threads=1) as sync:
            for algorithm in ("test-waits-for-a-second-bucket", "gtopk"):
                model = DistributedDataParallel(model_with_two_buckets(), bucket_cap_mb=1)
                state = CommHookState(sync, algorithm, 0.05, momentum=0.9, error_feedback=algorithm == "gtopk")
                model.register_comm_hook(state, comm_hook)
                train(model, torch.optim.SGD(model.parameters(), lr=0.05), rank, steps=4)
                state.close()
                outcome[algorithm] = {"params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist(),
                                      "buckets": sorted(state.last_stats)}
        outcome["entered"] = {step: len(seeds) for step, seeds in ENTERED.items()}
        outcome["waited_out"] = list(WAITED_OUT)
    finally:
        dist.destroy_process_group()
    return outcome


def test_ddp_hook_reduces_buckets_concurrently_and_replicas_agree() -> None:
    first, second = run_ranks(2, concurrent_buckets, timeout=150, group_kwargs=None)
    for outcome in (first, second):
        assert len(outcome["test-waits-for-a-second-bucket"]["buckets"]) >= 2
        assert outcome["entered"] and all(count >= 2 for count in outcome["entered"].values())
        assert outcome["waited_out"] == []  # bucket 0 never had to give up waiting for bucket 1
    for algorithm in ("test-waits-for-a-second-bucket", "gtopk"):
        assert first[algorithm]["params"] == second[algorithm]["params"], algorithm
