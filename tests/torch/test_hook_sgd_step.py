"""``CommHookState.sgd_step``: plain SGD after the DDP hook, taken at each sparse bucket's k
indices, leaves the parameters exactly where ``optimizer.step()`` would (two param groups with
their own learning rates, warm-up steps reduced dense), falls back to ``optimizer.step()`` for
an optimizer it cannot step sparsely, and steps nothing in an iteration whose bucket held NaN."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sparsecoll.torch import CommHookState, comm_hook, init_group
from tests.ranks import run_ranks
from tests.torch.test_optimizer import batch, flat_params, net

STEPS = 5
NAN_STEP = 3
"""The step at which rank 1's gradient holds NaN (in the run that injects it)."""


def run(sync, rank: int, sparse_step: bool, momentum: float = 0.0, inject_nan: bool = False) -> dict:
    model = DistributedDataParallel(net(hidden=24))
    state = CommHookState(sync, "gtopk", 0.05, momentum=0.9, warmup_steps=2)
    model.register_comm_hook(state, comm_hook)
    first, second = model.module[0], model.module[2]
    optimizer = torch.optim.SGD([{"params": first.parameters()}, {"params": second.parameters(), "lr": 0.03}],
                                lr=0.1, momentum=momentum)
    params, stepped = [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        features, labels = batch(step, rank)
        if inject_nan and step == NAN_STEP and rank == 1:
            features[0, 0] = float("nan")
        torch.nn.functional.cross_entropy(model(features), labels).backward()
        if sparse_step:
            stepped.append(state.sgd_step(optimizer))
        else:
            optimizer.step()
        params.append(flat_params(model).tolist())
    state.close()
    return {"params": params, "stepped": stepped}


def hook_rank(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        with init_group(timeout=60, kernel_threads=1) as sync:
            return {"dense": run(sync, rank, False), "sparse": run(sync, rank, True),
                    "momentum_dense": run(sync, rank, False, momentum=0.5),
                    "momentum_sparse": run(sync, rank, True, momentum=0.5),
                    "nan": run(sync, rank, True, inject_nan=True)}
    finally:
        dist.destroy_process_group()


def test_sgd_step_after_the_hook_equals_sgds_dense_step_and_skips_nan_iterations() -> None:
    per_rank = run_ranks(2, hook_rank, timeout=120, group_kwargs=None)
    for outcome in per_rank:
        assert outcome["sparse"]["params"] == outcome["dense"]["params"]  # bit for bit, every step
        assert outcome["sparse"]["stepped"] == [True] * STEPS
        assert outcome["momentum_sparse"]["params"] == outcome["momentum_dense"]["params"]
        nan = outcome["nan"]
        assert nan["stepped"] == [step != NAN_STEP for step in range(STEPS)]
        assert nan["params"][NAN_STEP] == nan["params"][NAN_STEP - 1]  # nothing moved, no NaN written
        assert nan["params"][-1] != nan["params"][NAN_STEP]
    assert per_rank[0]["nan"]["params"] == per_rank[1]["nan"]["params"]
    assert per_rank[0]["sparse"]["params"][1] != per_rank[0]["sparse"]["params"][0]
