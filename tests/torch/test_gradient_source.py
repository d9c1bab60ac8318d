"""A one-parameter bucket reads autograd's gradient where it is and its buffer only receives
results: the same ``.grad`` and parameters, bit for bit, as the path that copies the gradient
into the buffer, also when the previous step's k entries must be cleared and when user code
wrote to ``.grad`` between steps (the buffer's version moved, so it is zeroed whole)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsecoll.torch import SparseCollOptimizer, init_group
from sparsecoll.torch.buckets import Bucket
from tests.ranks import run_ranks

STEPS = 5
SCRIBBLE_AFTER = 2
"""After this step user code adds 1 to every ``.grad`` (before ``zero_grad``)."""


def train(rank: int, sync, density: float) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 60, bias=False), torch.nn.Tanh(), torch.nn.Linear(60, 3, bias=False))
    optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sync, "gtopk", density,
                                    bucket_bytes=40 * 60 * 4)  # a bucket a weight
    read_in_place, grads, params = [], [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        generator = torch.Generator().manual_seed(100 * step + rank)
        features = torch.randn(8, 40, generator=generator)
        torch.nn.functional.cross_entropy(model(features), torch.randint(0, 3, (8,), generator=generator)).backward()
        for bucket in optimizer.buckets:
            bucket.gather_grads()  # what step() does first (again there: it is idempotent)
        read_in_place.append([bucket.source is not None for bucket in optimizer.buckets])
        optimizer.step()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy())
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy())
        if step == SCRIBBLE_AFTER:
            for param in model.parameters():
                param.grad.add_(1.0)
    return {"read_in_place": read_in_place, "grads": grads, "params": params}


def both_paths(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    with init_group(timeout=120, kernel_threads=1) as sync:
        in_place = train(rank, sync, 0.05)
        saved = Bucket._readable_in_place
        Bucket._readable_in_place = lambda self, grad: False
        try:
            copied = train(rank, sync, 0.05)
        finally:
            Bucket._readable_in_place = saved
    return {"in_place": in_place, "copied": copied}


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    return run_ranks(2, both_paths, timeout=180, group_kwargs=None)


def test_reading_the_gradient_in_place_equals_copying_it_bit_for_bit(per_rank: list[dict]) -> None:
    for outcome in per_rank:
        assert all(all(flags) for flags in outcome["in_place"]["read_in_place"])
        assert not any(any(flags) for flags in outcome["copied"]["read_in_place"])
        for step in range(STEPS):
            np.testing.assert_array_equal(outcome["in_place"]["grads"][step], outcome["copied"]["grads"][step],
                                          err_msg=f".grad after step {step}")
            np.testing.assert_array_equal(outcome["in_place"]["params"][step], outcome["copied"]["params"][step],
                                          err_msg=f"parameters after step {step}")


def test_grad_holds_only_this_steps_k_entries(per_rank: list[dict]) -> None:
    for outcome in per_rank:
        for grads in outcome["in_place"]["grads"]:
            assert 0 < np.count_nonzero(grads) <= 2 * int(0.05 * 40 * 60 + 0.05 * 60 * 3 + 2)
