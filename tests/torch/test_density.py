"""Accordion's density schedule: its decisions, its agreement across real ranks, its state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sparsecoll.torch import CommHookState, SparseCollOptimizer, comm_hook, init_group
from sparsecoll.torch.density import Accordion, critical_regime
from tests.ranks import run_ranks
from tests.torch.test_optimizer import flat_params, net, train


def alone(values: np.ndarray) -> np.ndarray:
    """The agreement of a world of one: its own value."""
    return values


@pytest.mark.parametrize(("previous", "norm", "critical"), [
    (10.0, 10.0, False), (10.0, 6.0, False), (10.0, 5.0, True), (10.0, 4.0, True), (10.0, 14.9, False),
    (10.0, 15.0, True), (10.0, 40.0, True), (0.0, 0.0, True), (0.0, 1.0, True)])
def test_critical_when_the_relative_change_reaches_eta(previous: float, norm: float, critical: bool) -> None:
    assert critical_regime(previous, norm, 0.5) is critical


def test_each_interval_is_compared_with_the_one_before() -> None:
    schedule = Accordion(0.001, critical_density=0.01, interval=5)
    norms = [10.0, 10.0, 4.0, 3.9, 8.0, 8.1, 4.0, 1.9]
    # the first interval keeps start_critical; 10->10 calm; 4 follows a switch: only the new
    # reference; 4->3.9 calm; 3.9->8 (1.05) critical; 8.1 follows a switch; 8.1->4 (0.506) and
    # 4->1.9 (0.525) critical
    assert [schedule.record(5 * (i + 1), norm) for i, norm in enumerate(norms)] == [
        True, False, False, False, True, True, True, True]
    assert [step for step, _, _ in schedule.history] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert not Accordion(0.001, interval=1, start_critical=False).record(1, 3.0)


def gradient(scale: float, numel: int = 64, seed: int = 0) -> torch.Tensor:
    """A fixed direction of norm ``scale``."""
    direction = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    return direction * (scale / float(direction.norm()))


def test_the_norm_is_that_of_the_gradients_summed_over_the_interval() -> None:
    schedule = Accordion(0.001, critical_density=0.1, interval=3)
    scales = [1.0] * 3 + [1.0] * 3 + [0.3] * 3 + [0.3] * 2 + [3.0]  # the last interval: 0.3, 0.3, 3.0
    densities = []
    for step, scale in enumerate([*scales, 1.0]):
        densities.append(schedule.density_for(step, alone))
        schedule.observe(0, gradient(scale))
        schedule.observe(1, gradient(scale, 8, seed=1))
    # steps 6-8: the first sparse interval, only a reference; 9-11 (0.3, 0.3, 3.0) against it: critical
    assert densities == [0.1] * 6 + [0.001] * 6 + [0.1]
    norms = [norm for _, norm, _ in schedule.history]
    assert [step for step, _, _ in schedule.history] == [3, 6, 9, 12]
    assert norms[:3] == pytest.approx([3 * math.sqrt(2), 3 * math.sqrt(2), 0.9 * math.sqrt(2)])
    assert norms[3] == pytest.approx(3.6 * math.sqrt(2))  # 0.9 -> 3.6: critical again


def test_state_round_trip_continues_the_same_decisions() -> None:
    scales = [1.0, 1.0, 1.0, 1.0, 0.2, 0.2, 0.2, 0.2, 1.0, 1.0, 1.0, 1.0]  # switches to 0.01 at step 4
    straight = Accordion(0.01, critical_density=1.0, interval=2)
    resumed = Accordion(0.01, critical_density=1.0, interval=2)
    straight_densities, resumed_densities = [], []
    for step, scale in enumerate(scales):
        saved = straight.state_dict() if step == 5 else None  # mid-interval: the partial sum must travel too
        straight_densities.append(straight.density_for(step, alone))
        straight.observe(0, gradient(scale))
        if saved is not None:  # loaded after the original stepped on: the saved state must not have
            resumed = Accordion(0.01, critical_density=1.0, interval=2)
            resumed.load_state_dict(saved)
        resumed_densities.append(resumed.density_for(step, alone))
        resumed.observe(0, gradient(scale))
    assert resumed_densities == straight_densities and resumed.history == straight.history
    assert straight_densities == [1.0] * 4 + [0.01] * 6 + [1.0] * 2


@pytest.mark.parametrize("arguments", [
    {"density": 0.0}, {"density": 1.5}, {"critical_density": 0.0005}, {"critical_density": 2.0},
    {"interval": 0}, {"interval": 2.5}, {"interval": True}, {"eta": 0.0}, {"eta": -1.0}, {"eta": float("nan")},
    {"eta": float("inf")}])
def test_bad_arguments_are_refused(arguments: dict) -> None:
    settings = {"density": 0.001, "critical_density": 0.01, "interval": 10, **arguments}
    with pytest.raises(ValueError):
        Accordion(settings.pop("density"), **settings)


# ---------------------------------------------------------------- real ranks
INTERVAL = 2
LOCAL_SCALES = [  # per rank, per interval: local norms whose own decisions would disagree
    [1.0, 1.2, 1.2, 0.5],
    [1.0, 2.0, 1.0, 1.0],
    [1.0, 1.0, 1.0, 1.0],
]


def decisions(norms: list[float]) -> list[bool]:
    """What a schedule decides from these interval norms (the rule is checked above)."""
    schedule = Accordion(0.01, critical_density=0.5, interval=INTERVAL)
    return [schedule.record(step, float(norm)) for step, norm in enumerate(norms)]


def schedule_optimizer_and_hook(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env://, the launcher's store, as under torchrun
    try:
        with init_group(timeout=60, kernel_threads=1) as sync:
            schedule = Accordion(0.01, critical_density=0.5, interval=INTERVAL)
            densities = []
            for step in range(INTERVAL * len(LOCAL_SCALES[0]) + 1):
                scale = LOCAL_SCALES[rank][min(step // INTERVAL, len(LOCAL_SCALES[0]) - 1)]
                densities.append(schedule.for_step(step, [gradient(scale)], sync))
            return {"history": schedule.history, "densities": densities, "trained": train_with_accordion(sync, rank),
                    "hooked": hook_with_accordion(sync, rank)}
    finally:
        dist.destroy_process_group()


def hook_with_accordion(sync, rank: int) -> dict:
    model = DistributedDataParallel(net(hidden=32))
    state = CommHookState(sync, "gtopk", Accordion(0.05, critical_density=0.5, interval=2), momentum=0.9,
                          module=model)
    model.register_comm_hook(state, comm_hook)
    try:
        train(model, torch.optim.SGD(model.parameters(), lr=0.1), range(9), rank)
        saved = state.state_dict()["density_schedule"]
    finally:
        state.close()
    return {"history": state.density_schedule.history, "params": flat_params(model).tolist(),
            "saved": saved["history"] == state.density_schedule.history}


def train_with_accordion(sync, rank: int) -> dict:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    schedule = Accordion(0.02, critical_density=0.5, interval=3)
    optimizer = SparseCollOptimizer(torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), sync, "allgather",
                                    schedule)
    generator = torch.Generator().manual_seed(rank)
    densities, sent = [], []
    for step in range(15):
        features = torch.randn(16, 20, generator=generator) * (1 + rank) * (3.0 if step >= 9 else 1.0)
        optimizer.zero_grad()
        net(features).pow(2).mean().backward()
        optimizer.step()
        densities.append(schedule.critical_density if schedule.critical else schedule.density)
        sent.append(optimizer.last_stats.bytes_sent)
    saved = optimizer.state_dict()
    fresh = SparseCollOptimizer(torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), sync, "allgather",
                                Accordion(0.02, critical_density=0.5, interval=3))
    fresh.load_state_dict(saved)
    restored = fresh.density_schedule
    return {"history": schedule.history, "densities": densities, "sent": sent,
            "restored": (restored.history == schedule.history and restored.critical == schedule.critical
                         and all(torch.equal(restored._sums[key], schedule._sums[key]) for key in schedule._sums)),
            "weights": [float(param.detach().sum()) for param in net.parameters()]}


def test_every_rank_decides_alike_from_the_agreed_norm() -> None:
    results = run_ranks(3, schedule_optimizer_and_hook, timeout=240, group_kwargs=None)
    local = [decisions(scales) for scales in LOCAL_SCALES]
    assert len({tuple(decided) for decided in local}) > 1  # the premise: local norms would disagree
    agreed = decisions(list(np.mean(LOCAL_SCALES, axis=0)))
    for result in results:
        assert [critical for _, _, critical in result["history"]] == agreed, result["history"]
        assert result["history"] == results[0]["history"] and result["densities"] == results[0]["densities"]
        assert [norm for _, norm, _ in result["history"]] == pytest.approx(
            [INTERVAL * scale for scale in np.mean(LOCAL_SCALES, axis=0)])
    trained = [result["trained"] for result in results]
    assert all(t["history"] == trained[0]["history"] and t["weights"] == trained[0]["weights"] for t in trained)
    assert all(t["restored"] for t in trained)
    first = trained[0]
    # calm at 6 (a switch: 6-8 only the new reference), the inputs 3x from step 9: critical at 12
    assert [critical for _, _, critical in first["history"]] == [True, False, False, True]
    for density, sent in zip(first["densities"], first["sent"]):  # bytes follow the density
        dense_enough = density == 0.5
        assert (sent > 3 * min(first["sent"])) == dense_enough, (first["densities"], first["sent"])
    hooked = [result["hooked"] for result in results]  # iterations 1-8 compressed: decisions at 2, 4 and 6
    assert [step for step, _, _ in hooked[0]["history"]] == [2, 4, 6] and hooked[0]["saved"]
    assert all(h["history"] == hooked[0]["history"] and h["params"] == hooked[0]["params"] for h in hooked)
