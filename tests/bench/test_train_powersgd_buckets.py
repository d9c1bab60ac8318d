"""torch's PowerSGD hook as ``sparsecoll-bench train`` builds it, on the CNN, whose convolutions
DDP's default buckets put apart from its fully connected layers: two real ranks over Gloo train
past ``start_powerSGD_iter`` and end with the same weights. With two buckets the hook's
allreduces, issued from future callbacks, reach Gloo in a different order on each rank: Gloo
aborted the rank on the size mismatch (the 100 Mbit/s run stalled instead)."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from sparsecoll.bench import train_methods
from sparsecoll.bench.train_models import make_cnn
from tests.ranks import run_ranks

STEPS = 5
TOTAL_STEPS = 20
"""The run's length as PowerSGD's start sees it: compression from step 2 (10%, at least 2)."""


def powersgd_rank(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))  # a stall fails, not hangs
    try:
        hyper = train_methods.Hyper(lr=0.05, seed=0, warmup_steps=0, total_steps=TOTAL_STEPS, world=world)
        config = {"method": "powersgd", "algorithm": "powersgd", "rank": 1, "density": 1.0}
        method = train_methods.build("powersgd", make_cnn(784, 0, 10, seed=0), None, config, hyper)
        generator = torch.Generator().manual_seed(rank)  # each rank its own batches, as in training
        sent = []
        for _ in range(STEPS):
            inputs, labels = torch.rand(16, 784, generator=generator), torch.randint(0, 10, (16,), generator=generator)
            method.optimizer.zero_grad()
            torch.nn.functional.cross_entropy(method.forward(inputs), labels).backward()
            method.optimizer.step()
            sent.append(method.last_bytes())
        state = method._bytes.state
        return {"weights": torch.cat([p.detach().flatten() for p in method.model.parameters()]).tolist(),
                "sent": sent, "iter": state.iter, "buckets": sorted(state.error_dict),
                "numel": sum(p.numel() for p in method.model.parameters())}
    finally:
        dist.destroy_process_group()


def test_powersgd_row_trains_the_cnn_past_its_start_and_replicas_agree() -> None:
    first, second = run_ranks(2, powersgd_rank, timeout=90, group_kwargs=None)
    assert first["iter"] == second["iter"] == STEPS  # every step ran, compressed from step 2 on
    assert first["buckets"] == [0]  # the error feedback of one bucket: the whole gradient
    dense = train_methods.ring_payload(first["numel"], 4, 2)
    assert first["sent"][0] == dense and max(first["sent"][2:]) < dense / 50  # rank 1: P and Q only
    assert first["weights"] == second["weights"]  # the same reduced gradients on both ranks
