"""Replicas that stay identical without torch.manual_seed: rank 0's parameters and BatchNorm buffers
reach every rank, and a parameter unfrozen after wrapping fails on every rank instead of drifting."""

from __future__ import annotations

import pytest
import torch

from sparsecoll.errors import InvalidArgumentError
from sparsecoll.torch import BufferBroadcast, SparseCollOptimizer, init_group
from tests.ranks import run_ranks
from tests.torch.test_optimizer import batch


def normed_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 3))


def state_of(model: torch.nn.Module) -> list:
    return [tensor.detach().reshape(-1).tolist() for tensor in [*model.parameters(), *model.buffers()]]


def train_steps(model, optimizer, steps: range, rank: int) -> None:
    for step in steps:
        optimizer.zero_grad()
        features, labels = batch(step, rank)
        torch.nn.functional.cross_entropy(model(features), labels).backward()
        optimizer.step()


def replicas_rank(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    outcome = {}
    with init_group(timeout=60, kernel_threads=1) as sync:
        for algorithm in ("gtopk", "cltk"):
            model = normed_net(seed=100 + rank)  # a different initialisation on every rank
            optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sync,
                                            algorithm, 0.1, module=model)
            train_steps(model, optimizer, range(4), rank)
            if algorithm == "cltk":  # more forwards between steps: the pre-hook broadcasts before each
                model(batch(9, rank)[0])
                outcome["diverged"] = state_of(model)
                hook = BufferBroadcast(sync, model)
                model(batch(9, 0)[0])  # the same batch on every rank
                hook.remove()
                outcome["hooked"] = state_of(model)
                train_steps(model, optimizer, range(4, 5), rank)
            model.eval()
            with torch.no_grad():  # evaluation on one rank only needs no collective
                if rank == 0:
                    model(batch(0, rank)[0])
            model.train()
            outcome[algorithm] = state_of(model)
        model = normed_net(seed=100 + rank)  # without module=: parameters equal, buffers this rank's own
        optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync, "gtopk", 0.1)
        train_steps(model, optimizer, range(2), rank)
        outcome["params_only"] = [p.detach().reshape(-1).tolist() for p in model.parameters()]
        outcome["own_buffers"] = [b.detach().reshape(-1).tolist() for b in model.buffers()]

        for unfrozen_on in ((0, 1, 2), (1,)):
            model = normed_net(seed=0)
            model[0].weight.requires_grad_(False)
            optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync, "gtopk", 0.1,
                                            module=model)
            train_steps(model, optimizer, range(1), rank)
            if rank in unfrozen_on:
                model[0].weight.requires_grad_(True)
            with pytest.raises(InvalidArgumentError, match="in no bucket") as raised:
                train_steps(model, optimizer, range(1, 2), rank)
            outcome[f"stray {unfrozen_on}"] = str(raised.value)
        total, _ = sync.allreduce(torch.ones(2).numpy())
        outcome["usable"] = float(total[0]) == world
    return outcome


def test_different_seeds_and_batchnorm_end_bit_identical_and_unfrozen_parameters_raise() -> None:
    per_rank = run_ranks(3, replicas_rank, timeout=120, group_kwargs=None)
    for algorithm in ("gtopk", "cltk"):
        assert all(ranked[algorithm] == per_rank[0][algorithm] for ranked in per_rank), algorithm
    assert all(ranked["diverged"] != per_rank[0]["diverged"] for ranked in per_rank[1:])
    assert all(ranked["hooked"] == per_rank[0]["hooked"] for ranked in per_rank)
    assert all(ranked["params_only"] == per_rank[0]["params_only"] for ranked in per_rank)
    assert per_rank[1]["own_buffers"] != per_rank[0]["own_buffers"]  # what module= is for
    for ranked in per_rank:
        assert ranked["usable"]
        assert "shape (32, 8)" in ranked["stray (0, 1, 2)"]
    assert "shape (32, 8)" in per_rank[1]["stray (1,)"]
    assert "another rank" in per_rank[0]["stray (1,)"] and "another rank" in per_rank[2]["stray (1,)"]
