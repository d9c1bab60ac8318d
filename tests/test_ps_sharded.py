"""The sharded parameter server (AsyLPGConfig.num_servers > 1): 2 server ranks, 2 workers, real ranks."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from sparsecoll.errors import GroupAbortedError, InvalidArgumentError, PeerLostError
from sparsecoll.ps import AsyLPGConfig, Worker, serve
from sparsecoll.ps.config import MESSAGE_HEADER_BYTES, shard_bounds
from tests.ranks import run_ranks

DIM, ROWS = 101, 400  # odd: the two shards differ in size (51 and 50)
SERVERS, RANKS, STEPS = 2, 4, 75
SESSIONS = [
    dict(lr=0.3, param_bits=32, grad_bits=32),
    dict(lr=0.3, param_bits=8, grad_bits=4, density=0.25),
]


def least_squares_rows(rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Worker ``rank``'s rows of one noisy linear model."""
    truth = np.random.default_rng(0).normal(size=DIM)
    rng = np.random.default_rng(rank)
    features = rng.normal(size=(ROWS, DIM))
    return features, features @ truth + 0.1 * rng.normal(size=ROWS)


async def sharded_sessions(group) -> dict:
    """Each SESSIONS config with 2 servers, full-batch least squares; then the ranks' wrong calls."""
    results = {"sessions": []}
    for options in SESSIONS:
        config = AsyLPGConfig(num_servers=SERVERS, **options)
        if group.rank < SERVERS:
            results["sessions"].append(await serve(group, np.zeros(DIM), config, timeout=60))
        else:
            features, targets = least_squares_rows(group.rank)
            worker = Worker(group, DIM, config, timeout=60)
            params = await worker.pull()
            for _ in range(STEPS):
                params = await worker.push(features.T @ (features @ params - targets) / ROWS)
            await worker.close()
            results["sessions"].append((worker.stats, [shard.stats for shard in worker.shards]))
        await group.barrier(timeout=60)
    config = AsyLPGConfig(lr=0.1, num_servers=SERVERS)
    wrong_role = (lambda: Worker(group, DIM, config)) if group.rank < SERVERS else \
        (lambda: serve(group, np.zeros(DIM), config))  # a server rank as a worker; a worker rank as a server
    refused = []
    for call in (wrong_role, lambda: Worker(group, DIM, config, server=1)):  # server= cannot move the shards
        try:
            outcome = call()
            if asyncio.iscoroutine(outcome):
                await outcome
        except InvalidArgumentError:
            refused.append(True)
        else:
            refused.append(False)
    results["refused"] = refused
    return results


def train_torch_linear(sync) -> list:
    """serve_model / ModelWorker with 2 servers: each server loads the whole model, a worker's model holds x̂."""
    import torch

    from sparsecoll.ps.torch_model import ModelWorker, serve_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, 1)
    config = AsyLPGConfig(lr=0.3, param_bits=8, grad_bits=8, num_servers=SERVERS)
    if sync.rank < SERVERS:
        serve_model(sync, model, config, timeout=60)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()
    features, targets = (torch.from_numpy(a).float() for a in least_squares_rows(sync.rank))
    worker = ModelWorker(sync, model, config, timeout=60)
    for _ in range(10):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(features).squeeze(1), targets).backward()
        worker.step()
    held = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy()
    np.testing.assert_allclose(held, worker.worker.params, rtol=1e-6, atol=1e-6)  # the model holds x̂
    worker.close()
    return [worker.stats.pushes, len(worker.worker.shards)]


@pytest.fixture(scope="module")
def job() -> list[dict]:
    """One job of 4 real ranks (2 servers, 2 workers) runs the numpy sessions, then the torch one."""
    return run_ranks(RANKS, every_part, timeout=300, group_kwargs=None)


def every_part(rank: int, world_size: int) -> dict:
    import sparsecoll

    with sparsecoll.init_sync_group() as group:
        results = group.run(sharded_sessions(group.group))
        group.barrier()
        results["torch"] = train_torch_linear(group)
    return results


def test_two_servers_converge_and_every_shard_message_has_its_formula_size(job) -> None:
    rows = [least_squares_rows(rank) for rank in range(SERVERS, RANKS)]
    solution = np.linalg.lstsq(np.vstack([f for f, _ in rows]), np.concatenate([t for _, t in rows]),
                               rcond=None)[0]
    bounds = shard_bounds(DIM, SERVERS)
    assert bounds == [(0, 51), (51, 101)]
    for index, options in enumerate(SESSIONS):
        config = AsyLPGConfig(num_servers=SERVERS, **options)
        servers = [job[rank]["sessions"][index] for rank in range(SERVERS)]
        workers = [job[rank]["sessions"][index] for rank in range(SERVERS, RANKS)]
        (params, _), (other_params, _) = servers
        np.testing.assert_array_equal(params, other_params)  # every server returns the whole vector
        assert np.linalg.norm(params - solution) < 1e-2 * np.linalg.norm(solution), options
        for shard, (start, stop) in enumerate(bounds):
            size = stop - start
            _, stats = servers[shard]
            mine = [shard_stats[shard] for _, shard_stats in workers]
            assert stats.updates + stats.refused == sum(m.pushes for m in mine) == STEPS * len(workers)
            for m in mine:  # one pull and one DONE (header only), a push each step; a reply to each pull and push
                assert m.bytes_pushed == 2 * MESSAGE_HEADER_BYTES + m.pushes * config.push_bytes(size)
                assert m.bytes_pulled == (m.pulls + m.pushes) * config.pull_bytes(size)
            assert stats.bytes_received == sum(m.bytes_pushed for m in mine)
            assert stats.bytes_sent == sum(m.bytes_pulled for m in mine)
        for total, shard_stats in workers:
            assert (total.pulls, total.pushes) == (1, STEPS)
            assert total.bytes_pushed == sum(s.bytes_pushed for s in shard_stats)


def test_roles_that_do_not_match_the_server_ranks_are_refused(job) -> None:
    assert [job[rank]["refused"] for rank in range(RANKS)] == [[True, True]] * RANKS


def test_shard_bounds_cover_the_model_contiguously() -> None:
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(5, 1) == [(0, 5)]
    with pytest.raises(InvalidArgumentError):
        shard_bounds(2, 3)
    with pytest.raises(InvalidArgumentError):
        AsyLPGConfig(lr=0.1, num_servers=0)


async def die_mid_training(group, victim: int):
    """Two servers, two workers; server ``victim`` exits; return the error each survivor sees."""
    config = AsyLPGConfig(lr=0.01, num_servers=SERVERS)
    try:
        if group.rank < SERVERS:
            if group.rank == victim:
                asyncio.get_running_loop().call_later(1.0, os._exit, 1)
            return await serve(group, np.zeros(DIM), config, timeout=60)
        features, targets = least_squares_rows(group.rank)
        worker = Worker(group, DIM, config, timeout=60)
        params = await worker.pull()
        for _ in range(1_000_000):
            params = await worker.push(features.T @ (features @ params - targets) / ROWS)
    except (PeerLostError, GroupAbortedError) as error:
        return type(error).__name__
    return "finished"


def test_a_dead_server_fails_every_other_rank_with_a_named_error() -> None:
    victim = 1
    outcomes = run_ranks(RANKS, die_mid_training, victim, timeout=60, expect_dead=[victim])
    survivors = [outcome for rank, outcome in enumerate(outcomes) if rank != victim]
    assert all(outcome in ("PeerLostError", "GroupAbortedError") for outcome in survivors), survivors


def test_serve_model_and_model_worker_take_the_servers_from_the_config(job) -> None:
    first, second = job[0]["torch"], job[1]["torch"]
    assert first == second and len(first) == DIM + 1 and any(first)  # both servers hold the whole model
    assert [job[rank]["torch"] for rank in range(SERVERS, RANKS)] == [[10, SERVERS]] * (RANKS - SERVERS)
