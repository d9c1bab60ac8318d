"""The DDP communication hook beside a Gloo default process group on the same store."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sparsecoll.torch import CommHookState, comm_hook, init_group
from tests.ranks import run_ranks
from tests.torch.test_optimizer import flat_params, net, train


def ddp_rank(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env://, the launcher's store, as under torchrun
    results = {}
    try:
        with init_group(timeout=60, kernel_threads=1) as sync:
            for name in ("plain", "dense", "gtopk"):
                model = DistributedDataParallel(net(hidden=32))
                state = None
                if name != "plain":
                    state = CommHookState(sync, name, 0.05, momentum=0.9 if name == "gtopk" else 0.0,
                                          warmup_steps=2)
                    model.register_comm_hook(state, comm_hook)
                momentum = 0.0 if name == "gtopk" else 0.9  # the gtopk hook owns the momentum
                optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
                losses = train(model, optimizer, [0] * 12, rank)  # one batch again: the loss must fall
                sent = 0 if state is None else sum(stats.bytes_sent for stats in state.last_stats.values())
                saved = None if state is None else state.state_dict()
                results[name] = (flat_params(model).tolist(), losses, sent, saved is not None)
                if state is not None:
                    state.close()
    finally:
        dist.destroy_process_group()
    return results


def test_ddp_hook_dense_equals_ddp_and_gtopk_keeps_replicas_identical() -> None:
    first, second = run_ranks(2, ddp_rank, timeout=120, group_kwargs=None)
    plain = torch.tensor(first["plain"][0])
    assert torch.allclose(torch.tensor(first["dense"][0]), plain, atol=1e-5)
    assert first["gtopk"][0] == second["gtopk"][0]
    assert first["dense"][0] == second["dense"][0]
    assert first["gtopk"][2] > 0 and first["gtopk"][3]
    losses = first["gtopk"][1]
    assert sum(losses[-3:]) < sum(losses[:3])
