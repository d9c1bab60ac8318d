"""The DDP communication hook beside a Gloo default process group on the same store; and
``CommHookState.sgd_step``: plain SGD after the hook, taken at each sparse bucket's k indices,
leaves the parameters exactly where ``optimizer.step()`` would (two param groups with their own
learning rates, warm-up steps reduced dense), falls back to ``optimizer.step()`` for an
optimizer it cannot step sparsely, and steps nothing in an iteration whose bucket held NaN."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sparsecoll.errors import InvalidArgumentError, PerBucketDensityWarning
from sparsecoll.torch import CommHookState, comm_hook, init_group
from sparsecoll.torch.density import Accordion
from tests.ranks import run_ranks
from tests.torch.test_optimizer import batch, flat_params, net, train, train_amp_or_plain


SGD_STEPS = 5
NAN_STEP = 3
"""The step at which rank 1's gradient holds NaN (in the run that injects it)."""


def sgd_step_run(sync, rank: int, sparse_step: bool, momentum: float = 0.0, inject_nan: bool = False) -> dict:
    model = DistributedDataParallel(net(hidden=24))
    state = CommHookState(sync, "gtopk", 0.05, momentum=0.9, warmup_steps=2)
    model.register_comm_hook(state, comm_hook)
    first, second = model.module[0], model.module[2]
    optimizer = torch.optim.SGD([{"params": first.parameters()}, {"params": second.parameters(), "lr": 0.03}],
                                lr=0.1, momentum=momentum)
    params, stepped = [], []
    for step in range(SGD_STEPS):
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


def split_warnings(sync, rank: int, algorithm: str, bucket_cap_mb: float | None) -> list[str]:
    """The PerBucketDensityWarnings of 3 iterations with DDP's buckets capped at ``bucket_cap_mb``
    (0.0005: a bucket a layer or two; None: one bucket for the whole model)."""
    model = DistributedDataParallel(net(hidden=64), bucket_cap_mb=bucket_cap_mb or 1)
    state = CommHookState(sync, algorithm, 0.01 if algorithm != "dense" else 1.0)
    model.register_comm_hook(state, comm_hook)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, torch.optim.SGD(model.parameters(), lr=0.1), range(3), rank)
    state.close()
    return [str(warning.message) for warning in caught if warning.category is PerBucketDensityWarning]


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
            results["sgd_step"] = {"dense": sgd_step_run(sync, rank, False), "sparse": sgd_step_run(sync, rank, True),
                                   "momentum_dense": sgd_step_run(sync, rank, False, momentum=0.5),
                                   "momentum_sparse": sgd_step_run(sync, rank, True, momentum=0.5),
                                   "nan": sgd_step_run(sync, rank, True, inject_nan=True)}
            results["split_warnings"] = {case: split_warnings(sync, rank, *case)
                                         for case in (("gtopk", 0.0005), ("gtopk", None), ("dense", 0.0005))}
    finally:
        dist.destroy_process_group()
    return results


@pytest.fixture(scope="module")
def ddp_ranks() -> list[dict]:
    return run_ranks(2, ddp_rank, timeout=120, group_kwargs=None)


def test_ddp_hook_dense_equals_ddp_and_gtopk_keeps_replicas_identical(ddp_ranks: list[dict]) -> None:
    first, second = ddp_ranks
    plain = torch.tensor(first["plain"][0])
    assert torch.allclose(torch.tensor(first["dense"][0]), plain, atol=1e-5)
    assert first["gtopk"][0] == second["gtopk"][0]
    assert first["dense"][0] == second["dense"][0]
    assert first["gtopk"][2] > 0 and first["gtopk"][3]
    losses = first["gtopk"][1]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_sgd_step_after_the_hook_equals_sgds_dense_step_and_skips_nan_iterations(ddp_ranks: list[dict]) -> None:
    per_rank = [outcome["sgd_step"] for outcome in ddp_ranks]
    for outcome in per_rank:
        assert outcome["sparse"]["params"] == outcome["dense"]["params"]  # bit for bit, every step
        assert outcome["sparse"]["stepped"] == [True] * SGD_STEPS
        assert outcome["momentum_sparse"]["params"] == outcome["momentum_dense"]["params"]
        nan = outcome["nan"]
        assert nan["stepped"] == [step != NAN_STEP for step in range(SGD_STEPS)]
        assert nan["params"][NAN_STEP] == nan["params"][NAN_STEP - 1]  # nothing moved, no NaN written
        assert nan["params"][-1] != nan["params"][NAN_STEP]
    assert per_rank[0]["nan"]["params"] == per_rank[1]["nan"]["params"]
    assert per_rank[0]["sparse"]["params"][1] != per_rank[0]["sparse"]["params"][0]


RESUMES = ("gtopk", "oktopk")
"""Ok-Topk's thresholds, reused between estimations, must come back from the save too."""


def ddp_resume_rank(rank: int, world: int) -> tuple[dict, bool]:
    """Ten steps straight, and five + save + a fresh model, optimizer and hook state + five."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        with init_group(timeout=60, kernel_threads=1) as sync:
            def build(algorithm: str, per_parameter: bool = True, seed: int = 0):
                model = DistributedDataParallel(net(seed, hidden=32))
                state = CommHookState(sync, algorithm, 0.05, momentum=0.9, warmup_steps=3,
                                      module=model if per_parameter else None,
                                      algorithm_options={"interval": 4} if algorithm == "oktopk" else None)
                model.register_comm_hook(state, comm_hook)
                return model, state, torch.optim.SGD(model.parameters(), lr=0.1)

            outcome = {}
            for algorithm in RESUMES:
                model, state, optimizer = build(algorithm)
                straight = train(model, optimizer, range(10), rank)
                straight_params = flat_params(model).tolist()
                state.close()

                model, state, optimizer = build(algorithm)
                first = train(model, optimizer, range(5), rank)
                saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "hook": state.state_dict()}
                state.close()
                model, state, optimizer = build(algorithm, seed=1)  # all must come from the save
                model.load_state_dict(saved["model"])
                optimizer.load_state_dict(saved["optimizer"])
                state.load_state_dict(saved["hook"])
                resumed = first + train(model, optimizer, range(5, 10), rank)
                state.close()
                outcome[algorithm] = (straight, resumed, straight_params, flat_params(model).tolist())
            # without module= the buckets are known by their sizes only: a fresh model's first bucket
            # (parameters in construction order, not the rebuilt order saved) must start afresh
            model, state, optimizer = build("gtopk", per_parameter=False)
            train(model, optimizer, range(5), rank)
            saved_state = state.state_dict()
            state.close()
            model, state, optimizer = build("gtopk", per_parameter=False)
            state.load_state_dict(saved_state)
            loaded = state.memories[0]
            train(model, optimizer, range(5, 6), rank)
            state.close()
            return outcome, state.memories[0] is loaded
    finally:
        dist.destroy_process_group()


def test_ddp_hook_resumes_exactly_from_saved_state() -> None:
    for outcome, kept_reordered in run_ranks(2, ddp_resume_rank, timeout=120, group_kwargs=None):
        assert not kept_reordered
        for variant, (straight, resumed, straight_params, resumed_params) in outcome.items():
            assert resumed == straight, variant
            assert resumed_params == straight_params, variant


def test_sgd_step_counts_as_the_optimizers_step_for_an_lr_scheduler() -> None:
    """torch's LR scheduler warns when its step() comes before any optimizer.step(); sgd_step is
    that step, so a scheduler beside it stays quiet and decays the rate that sgd_step then uses."""
    from sparsecoll.sync import init_sync_group

    store = dist.HashStore()
    dist.init_process_group("gloo", store=dist.PrefixStore("torch", store), rank=0, world_size=1)
    try:
        with init_sync_group(store=store, rank=0, world_size=1, timeout=30) as sync:
            model = DistributedDataParallel(net(hidden=32), gradient_as_bucket_view=True)
            state = CommHookState(sync, "gtopk", 0.1, momentum=0.9, module=model)
            model.register_comm_hook(state, comm_hook)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                for step in range(3):
                    optimizer.zero_grad()
                    features, labels = batch(step, 0)
                    torch.nn.functional.cross_entropy(model(features), labels).backward()
                    state.sgd_step(optimizer)
                    scheduler.step()
            state.close()
        assert state.sparse_steps == 3
        assert optimizer.param_groups[0]["lr"] == 0.1 * 0.5 ** 3
    finally:
        dist.destroy_process_group()


def hook_run(sync, scaler, steps: int = 6, tell_hook: bool = True, accordion: bool = False) -> tuple[torch.Tensor, dict]:
    """The hook (gTop-k, momentum kept by the hook) for ``steps`` iterations, with ``scaler``
    driving AMP's loss scale (given to the hook with ``tell_hook``) or plain; the parameters at
    the end, and the hook's saved state."""
    model = DistributedDataParallel(net(hidden=32), gradient_as_bucket_view=True)
    density = Accordion(0.1, critical_density=0.5, interval=2) if accordion else 0.1
    state = CommHookState(sync, "gtopk", density, momentum=0.9, module=model,
                          grad_scaler=scaler if tell_hook else None)
    model.register_comm_hook(state, comm_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_amp_or_plain(model, optimizer, range(steps), scaler)
    state.close()
    return flat_params(model), state.state_dict()


@pytest.mark.parametrize("accordion", [False, True])
def test_residuals_follow_the_loss_scale_as_amp_changes_it(accordion: bool) -> None:
    """A GradScaler that doubles its scale every two steps: given it, the hook's residuals and
    momentum change units with the gradients, and the run equals a plain one bit for bit (the
    scales are powers of two); not given it, they do not."""
    from sparsecoll.sync import init_sync_group

    store = dist.HashStore()
    dist.init_process_group("gloo", store=dist.PrefixStore("torch", store), rank=0, world_size=1)
    try:
        with init_sync_group(store=store, rank=0, world_size=1, timeout=30) as sync:
            plain, plain_saved = hook_run(sync, None, accordion=accordion)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=2)
            followed, saved = hook_run(sync, scaler, accordion=accordion)
            assert scaler.get_scale() == 2.0 ** 11  # it changed three times
            unfollowed, _ = hook_run(sync, torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=2),
                                     tell_hook=False, accordion=accordion)
            resumed = CommHookState(sync, "gtopk", 0.1, momentum=0.9, grad_scaler=scaler,
                                    module=DistributedDataParallel(net(hidden=32)))
            with pytest.raises(InvalidArgumentError, match="scaler.step"):
                resumed.sgd_step(torch.optim.SGD(net().parameters(), lr=0.1))  # it would step scaled gradients
            resumed.load_state_dict(saved)  # the residuals load in the scale they were saved in
            resumed.follow_loss_scale()
            assert saved["loss_scale"] == 2.0 ** 10 and resumed.state_dict()["loss_scale"] == 2.0 ** 11
            name, kept = next((name, kept) for name, kept in saved["parameters"].items() if kept["residual"].any())
            assert torch.equal(resumed.state_dict()["parameters"][name]["residual"], 2 * kept["residual"])
    finally:
        dist.destroy_process_group()
    assert torch.equal(followed, plain)
    assert not torch.equal(unfollowed, plain)
    if accordion:  # its norms are of the unscaled gradients: the same decisions, and a switch among them
        assert saved["density_schedule"]["history"] == plain_saved["density_schedule"]["history"]
        assert len({critical for *_, critical in plain_saved["density_schedule"]["history"]}) == 2


def test_split_buckets_warn_once_that_each_is_compressed_on_its_own(ddp_ranks: list[dict]) -> None:
    for outcome in ddp_ranks:
        split = outcome["split_warnings"]
        assert len(split[("gtopk", 0.0005)]) == 1, split  # once, though 2 compressed iterations saw it
        message = split[("gtopk", 0.0005)][0]
        assert "buckets" in message and "density 0.01" in message and "bucket_cap_mb=2" in message, message
        assert split[("gtopk", None)] == [] and split[("dense", 0.0005)] == []
