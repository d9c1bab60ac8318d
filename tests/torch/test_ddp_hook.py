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


def ddp_resume_rank(rank: int, world: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """Ten steps straight, and five + save + a fresh model, optimizer and hook state + five."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        with init_group(timeout=60, kernel_threads=1) as sync:
            def build(seed: int = 0):
                model = DistributedDataParallel(net(seed, hidden=32))
                state = CommHookState(sync, "gtopk", 0.05, momentum=0.9, warmup_steps=3, module=model)
                model.register_comm_hook(state, comm_hook)
                return model, state, torch.optim.SGD(model.parameters(), lr=0.1)

            model, state, optimizer = build()
            straight = train(model, optimizer, range(10), rank)
            straight_params = flat_params(model).tolist()
            state.close()

            model, state, optimizer = build()
            first = train(model, optimizer, range(5), rank)
            saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "hook": state.state_dict()}
            state.close()
            model, state, optimizer = build(seed=1)  # different initial weights: all must come from the save
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            state.load_state_dict(saved["hook"])
            resumed = first + train(model, optimizer, range(5, 10), rank)
            state.close()
            return straight, resumed, straight_params, flat_params(model).tolist()
    finally:
        dist.destroy_process_group()


def test_ddp_hook_resumes_exactly_from_saved_state() -> None:
    for straight, resumed, straight_params, resumed_params in run_ranks(2, ddp_resume_rank, timeout=120,
                                                                          group_kwargs=None):
        assert resumed == straight
        assert resumed_params == straight_params
