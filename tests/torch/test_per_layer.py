"""Aji & Heafield's per-layer selection as a named option: every layer keeps its own top density."""

from __future__ import annotations

import numpy as np
import torch

from sparsecoll.torch import SparseCollOptimizer, init_group
from tests.ranks import run_ranks

DENSITY = 0.05


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 20))


def both(rank: int, world: int) -> tuple[dict, dict]:
    torch.set_num_threads(1)
    with init_group(timeout=60, kernel_threads=1) as sync:
        return one_step(sync, rank, False), one_step(sync, rank, True)


def one_step(sync, rank: int, per_layer: bool) -> dict:
    net = model()
    with torch.no_grad():
        net[2].weight.mul_(1e-3)  # the first layer's gradients become tiny: a shared cut skips it
    optimizer = SparseCollOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), sync, "allgather", DENSITY,
                                    per_layer=per_layer, momentum_correction=False)
    generator = torch.Generator().manual_seed(rank)
    features = torch.randn(16, 40, generator=generator)
    loss = net(features).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    sent = {}
    for bucket in optimizer.buckets:
        if bucket.compressed:
            for param in bucket.params:
                sent[tuple(param.shape)] = int(torch.count_nonzero(param.grad))
    return {"buckets": [len(bucket.params) for bucket in optimizer.buckets if bucket.compressed], "sent": sent}


def test_per_layer_gives_every_layer_its_own_density() -> None:
    shared, layered = run_ranks(2, both, timeout=90, group_kwargs=None)[0]
    assert shared["buckets"] == [2] and layered["buckets"] == [1, 1]
    for shape, nonzero in layered["sent"].items():  # each layer: its own top 5% from each of 2 ranks
        own = round(DENSITY * int(np.prod(shape)))
        assert own <= nonzero <= 2 * own, (shape, nonzero, own)
    assert shared["sent"][(30, 40)] < round(DENSITY * 1200), shared  # one shared cut: the tiny layer loses out
