"""SparseCollOptimizer(overlap=True) on real ranks: the parameters of overlap=False bit for bit
(several algorithms, a parameter without gradient on one rank, no_sync() accumulation), and the
bad input of issue 21: a second backward, an exception between backward and step on every rank
or on one, a NaN, a stray parameter, a layout that differs between ranks."""

from __future__ import annotations

import pytest
import torch

from sparsecoll.collectives.lazy import LazyState
from sparsecoll.errors import InvalidArgumentError
from sparsecoll.torch import SparseCollOptimizer, init_group
from tests.ranks import run_ranks

NO_GROUP = {"group_kwargs": None}
CONFIGS = [("gtopk", 0.1, {"momentum": 0.9, "weight_decay": 0.01, "nesterov": True}, {}),
           ("allgather", 0.1, {"momentum": 0.9}, {"quantize_bits": 8}),
           ("cltk", 0.1, {"momentum": 0.9}, {"warmup_steps": 2}),
           ("dense", 1.0, {}, {"lazy": LazyState()})]


class Net(torch.nn.Module):
    """Three layers in separate buckets; ``spare`` takes part only where ``use_spare``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second, self.head = torch.nn.Linear(8, 24), torch.nn.Linear(24, 24), torch.nn.Linear(24, 3)
        self.spare = torch.nn.Linear(24, 3)

    def forward(self, features: torch.Tensor, use_spare: bool = False) -> torch.Tensor:
        hidden = torch.tanh(self.second(torch.tanh(self.first(features))))
        return self.head(hidden) + (self.spare(hidden) if use_spare else 0)


def loss_of(model: Net, step: int, rank: int, part: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(10000 * step + 100 * rank + part)
    features, labels = torch.randn(6, 8, generator=generator), torch.randint(0, 3, (6,), generator=generator)
    return torch.nn.functional.cross_entropy(model(features, use_spare=rank == 0), labels)


def params_of(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([param.detach().reshape(-1) for param in model.parameters()])


def build(sync, algorithm: str, density: float, sgd: dict, extra: dict, overlap: bool) -> tuple:
    model = Net()
    optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, **sgd), sync, algorithm, density,
                                    bucket_bytes=1000, overlap=overlap, **extra)
    return model, optimizer


def train(model: Net, optimizer: SparseCollOptimizer, rank: int, steps: int = 6) -> None:
    """Plain steps, and every third step two micro-batches accumulated under no_sync()."""
    for step in range(steps):
        optimizer.zero_grad()
        if step % 3 == 2:
            with optimizer.no_sync():
                loss_of(model, step, rank, part=1).backward()
        loss_of(model, step, rank).backward()
        optimizer.step()


def same_with_and_without_overlap(rank: int, world: int) -> list[dict]:
    torch.set_num_threads(1)
    outcomes = []
    with init_group(timeout=60, kernel_threads=1) as sync:
        for algorithm, density, sgd, extra in CONFIGS:
            trained = {}
            for overlap in (False, True):
                model, optimizer = build(sync, algorithm, density, sgd, extra, overlap)
                train(model, optimizer, rank)
                trained[overlap] = (params_of(model), optimizer)
            on = trained[True][1]
            outcomes.append({"algorithm": algorithm, "equal": torch.equal(trained[False][0], trained[True][0]),
                             "params": trained[True][0].tolist(), "buckets": len(on.buckets),
                             "launched_by_backward": on._scheduler.launched_by_backward,
                             "rounds": on._scheduler.rounds, "bytes": on.last_stats.bytes_sent})
    return outcomes


def test_overlap_gives_the_parameters_of_overlap_off_bit_for_bit() -> None:
    ranks = run_ranks(2, same_with_and_without_overlap, timeout=120, **NO_GROUP)
    for config, (mine, theirs) in zip(CONFIGS, zip(*ranks)):
        assert mine["equal"] and theirs["equal"], config
        assert mine["params"] == theirs["params"], config  # replicas identical
        assert mine["rounds"] == 5 and mine["bytes"] > 0
        # rounds 2..6 launched by backward: every bucket on rank 0; on rank 1 not spare's
        # buckets (no gradient there: launched at the end of backward, as zero)
        buckets = mine["buckets"]
        assert mine["launched_by_backward"] == 5 * buckets, config
        assert 0 < theirs["launched_by_backward"] < 5 * buckets, config


def bad_input(rank: int, world: int) -> dict:
    """The issue's bad input, in order on one group; the last one poisons it."""
    torch.set_num_threads(1)
    outcome: dict = {}
    with init_group(timeout=30, kernel_threads=1) as sync:
        model, optimizer = build(sync, "dense", 1.0, {}, {}, True)
        reference, plain = build(sync, "dense", 1.0, {}, {}, False)
        step = 0

        def both(step: int) -> None:  # one step on each model
            for net, opt in ((model, optimizer), (reference, plain)):
                opt.zero_grad()
                loss_of(net, step, rank).backward()
                opt.step()

        both(step)
        both(step := step + 1)
        # 1. a second backward before step(), outside no_sync(): refused before it writes
        optimizer.zero_grad()
        loss_of(model, 2, rank).backward()
        try:
            loss_of(model, 3, rank).backward()
        except InvalidArgumentError as error:
            outcome["second_backward"] = str(error)
        # 2. an exception in user code between backward and step, on every rank: the step is
        # dropped (zero_grad), the next steps work and match a run that never had that batch
        optimizer.zero_grad()
        loss_of(model, 4, rank).backward()
        outcome["grads_after_backward"] = torch.cat([param.grad.reshape(-1) for param in model.parameters()]).tolist()
        try:
            raise RuntimeError("user code failed between backward() and step()")
        except RuntimeError:
            optimizer.zero_grad()
        both(step := step + 1)
        both(step := step + 1)
        outcome["after_dropped_steps"] = torch.equal(params_of(model), params_of(reference))
        # 3. a NaN on rank 1 only: skipped on every rank, parameters untouched
        before = params_of(model)
        optimizer.zero_grad()
        loss = loss_of(model, 9, rank)
        if rank == 1:
            loss = loss * torch.tensor(float("nan"))
        loss.backward()
        optimizer.step()
        outcome["nan_skipped"] = (optimizer.skipped_steps, torch.equal(before, params_of(model)))
        # 4. a parameter frozen when the optimizer was built gets a gradient on rank 0: every rank raises
        frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
        optimizer.add_param_group({"params": [frozen]})
        optimizer.zero_grad()
        frozen.requires_grad_(rank == 0)
        (loss_of(model, 10, rank) + (frozen.sum() if rank == 0 else 0)).backward()
        try:
            optimizer.step()
        except InvalidArgumentError as error:
            outcome["stray"] = str(error)
        frozen.requires_grad_(False)
        frozen.grad = None
        both(step := step + 1)
        outcome["params"] = params_of(model).tolist()
        # 5. the exception on rank 1 only: it drops the step the others take; the next step
        # raises CollectiveMismatchError on every rank instead of pairing different steps
        optimizer.zero_grad()
        loss_of(model, 12, rank).backward()
        try:
            if rank == 1:
                optimizer.zero_grad()  # meets rank 0's step: both raise here
                loss_of(model, 13, rank).backward()
            optimizer.step()
        except Exception as error:
            outcome["one_rank_dropped"] = str(error)
    # 6. hooks on a model whose parameters differ across ranks: every rank raises, none hangs
    with init_group(timeout=30, kernel_threads=1, name="layouts") as sync:
        try:
            SparseCollOptimizer(torch.optim.SGD(torch.nn.Linear(8, 3 + rank).parameters(), lr=0.1), sync,
                                "gtopk", 0.1, overlap=True)
        except Exception as error:
            outcome["layouts_differ"] = type(error).__name__
    return outcome


def test_bad_input_under_overlap_raises_clearly_and_leaves_the_next_step_working() -> None:
    ranks = run_ranks(2, bad_input, timeout=120, **NO_GROUP)
    for outcome in ranks:
        assert "no_sync()" in outcome["second_backward"]
        assert outcome["after_dropped_steps"]
        assert outcome["nan_skipped"] == (1, True)
        assert "no bucket" in outcome["stray"]
        assert "some step, some drop it" in outcome["one_rank_dropped"]
        assert outcome["layouts_differ"] == "CollectiveMismatchError"
    assert ranks[0]["params"] == ranks[1]["params"]
    # backward returned with the mean in .grad on every rank (spare's too, unused on rank 1)
    assert ranks[0]["grads_after_backward"] == ranks[1]["grads_after_backward"]


@pytest.mark.parametrize("extra", [{"clip_norm": 1.0}, {"grad_scaler": object()}])
def test_overlap_refuses_what_needs_every_bucket_first(extra: dict) -> None:
    import torch.distributed as dist

    from sparsecoll.sync import init_sync_group

    sync = init_sync_group(store=dist.HashStore(), rank=0, world_size=1, timeout=10)
    try:
        with pytest.raises(ValueError, match="overlap=True"):
            SparseCollOptimizer(torch.optim.SGD(Net().parameters(), lr=0.1), sync, overlap=True, **extra)
    finally:
        sync.close()


def test_a_dropped_optimizers_hooks_go_with_it() -> None:
    import torch.distributed as dist

    from sparsecoll.sync import init_sync_group

    sync = init_sync_group(store=dist.HashStore(), rank=0, world_size=1, timeout=10)
    try:
        model = Net()
        for _ in range(2):  # a second optimizer for the same model, the first one dropped
            optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync, "gtopk", 0.1,
                                            bucket_bytes=1000, overlap=True)  # no cycle keeps the first
            for step in range(3):
                optimizer.zero_grad()
                loss_of(model, step, 0).backward()  # the first one's guard would refuse this
                optimizer.step()
            assert optimizer.overlapping and optimizer._scheduler.launched_by_backward == 2 * len(optimizer.buckets)
    finally:
        sync.close()
