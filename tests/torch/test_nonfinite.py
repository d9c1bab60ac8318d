"""A NaN or inf gradient on one rank: skipped on every rank with the residuals and momentum as they
were, or NonFiniteGradientError on every rank; the group stays usable. Every builtin algorithm,
the NaN on CLT-k's leader and on a rank that is not the leader, through the optimizer and the DDP
hook, in one spawn of three ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sparsecoll.errors import NonFiniteGradientError
from sparsecoll.torch import CommHookState, SparseCollOptimizer, comm_hook, init_group
from tests.ranks import run_ranks
from tests.torch.test_optimizer import batch, flat_params, net

ALGORITHMS = ("dense", "allgather", "gtopk", "sketch", "cltk")
WORLD = 3


def backward(model, step: int, rank: int, poisoned: bool) -> None:
    features, labels = batch(step, rank)
    torch.nn.functional.cross_entropy(model(features), labels).backward()
    if poisoned:
        first = next(model.parameters())
        first.grad.view(-1)[3] = float("nan")


def memories_of(optimizer) -> list:
    return [(memory.residual.clone(), None if memory.momentum is None else memory.momentum.clone())
            for memory in optimizer.memories]


def same_memories(before: list, after: list) -> bool:
    return all(torch.equal(r0, r1) and ((m0 is None and m1 is None) or torch.equal(m0, m1))
               for (r0, m0), (r1, m1) in zip(before, after))


def through_optimizer(rank: int, sync, algorithm: str) -> dict:
    """Three steps, a NaN on the CLT-k leader (rank 0, as steps % 3 == 0), a NaN on rank 1 (not the
    leader), two more steps; then with skip_nonfinite=False, a NaN on rank 2 and one more step."""
    model = net(hidden=32)
    optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sync,
                                    algorithm, 0.1, dense_if=None)
    outcome = {"unchanged": [], "kept": []}
    step = 0
    for poisoned_rank in (None, None, None, 0, 1, None, None):
        optimizer.zero_grad()
        backward(model, step, rank, poisoned_rank == rank)
        params, memories = flat_params(model).clone(), memories_of(optimizer)
        optimizer.step()
        if poisoned_rank is not None:
            outcome["unchanged"].append(torch.equal(params, flat_params(model)))
            outcome["kept"].append(same_memories(memories, memories_of(optimizer)))
        step += 1
    optimizer.skip_nonfinite = False
    optimizer.zero_grad()
    backward(model, step, rank, rank == 2)
    params, memories = flat_params(model).clone(), memories_of(optimizer)
    try:
        optimizer.step()
    except NonFiniteGradientError as error:
        outcome["raised"] = str(error)
    outcome["unchanged"].append(torch.equal(params, flat_params(model)))
    outcome["kept"].append(same_memories(memories, memories_of(optimizer)))
    optimizer.zero_grad()
    backward(model, step + 1, rank, False)
    optimizer.step()  # the group and the optimizer still work
    outcome.update(params=flat_params(model).tolist(), steps=optimizer.steps, skipped=optimizer.skipped_steps,
                   finite=bool(torch.isfinite(flat_params(model)).all()))
    return outcome


def through_hook(rank: int, sync, algorithm: str) -> dict:
    """The DDP hook: a NaN on rank 1 reaches every rank as NaN (GradScaler skips everywhere) and leaves
    the memories alone; with skip_nonfinite=False backward fails on every rank; the group works on."""
    model = DistributedDataParallel(net(hidden=32))
    state = CommHookState(sync, algorithm, 0.1, momentum=0.9, start_iter=0, module=model)
    model.register_comm_hook(state, comm_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    outcome = {}
    for step, poisoned_rank in enumerate((None, None, 1, None)):
        optimizer.zero_grad()
        params = flat_params(model).clone()
        memories = {index: memory.state_dict() for index, memory in state.memories.items()}
        features, labels = batch(step, rank)
        _poisoned_backward(model, features, labels, rank == poisoned_rank, scaler)
        if poisoned_rank is not None:
            outcome["all_nan"] = all(bool(torch.isnan(p.grad).all()) for p in model.parameters())
            outcome["kept"] = all(torch.equal(memories[index]["residual"], memory.residual)
                                  for index, memory in state.memories.items())
        scaler.step(optimizer)
        scaler.update()
        if poisoned_rank is not None:
            outcome["unchanged"] = torch.equal(params, flat_params(model))
    state.skip_nonfinite = False
    features, labels = batch(9, rank)
    try:
        _poisoned_backward(model, features, labels, rank == 0)
    except RuntimeError as error:
        outcome["raised"] = "NonFiniteGradientError" in str(error) or "NaN or inf" in str(error)
    total, _ = sync.allreduce(torch.ones(4).numpy())  # the group is still usable
    outcome.update(params=flat_params(model).tolist(), skipped=state.skipped_steps, usable=float(total[0]) == WORLD)
    state.close()
    return outcome


def _poisoned_backward(model, features, labels, poisoned: bool, scaler=None) -> None:
    loss = torch.nn.functional.cross_entropy(model(features), labels)
    if poisoned:
        loss = loss * float("nan")
    (loss if scaler is None else scaler.scale(loss)).backward()


def nonfinite_rank(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        with init_group(timeout=60, kernel_threads=1) as sync:
            return {"optimizer": {name: through_optimizer(rank, sync, name) for name in ALGORITHMS},
                    "hook": {name: through_hook(rank, sync, name) for name in ("gtopk", "cltk")}}
    finally:
        dist.destroy_process_group()


def test_nonfinite_steps_are_skipped_or_raised_on_every_rank_for_every_algorithm() -> None:
    per_rank = run_ranks(WORLD, nonfinite_rank, timeout=240, group_kwargs=None)
    for algorithm in ALGORITHMS:
        outcomes = [ranked["optimizer"][algorithm] for ranked in per_rank]
        for outcome in outcomes:
            assert outcome["unchanged"] == [True] * 3, algorithm
            assert outcome["kept"] == [True] * 3, algorithm
            assert "NaN or inf" in outcome.get("raised", ""), algorithm
            assert (outcome["steps"], outcome["skipped"]) == (6, 2), algorithm
            assert outcome["finite"], algorithm
        assert all(outcome["params"] == outcomes[0]["params"] for outcome in outcomes), algorithm
    for algorithm in ("gtopk", "cltk"):
        outcomes = [ranked["hook"][algorithm] for ranked in per_rank]
        for outcome in outcomes:
            assert outcome["all_nan"] and outcome["kept"] and outcome["unchanged"], (algorithm, outcome)
            assert outcome["raised"] and outcome["usable"] and outcome["skipped"] == 1, (algorithm, outcome)
        assert all(outcome["params"] == outcomes[0]["params"] for outcome in outcomes), algorithm
