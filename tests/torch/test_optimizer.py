"""SparseCollOptimizer on real ranks: dense equals torch SGD, replicas stay identical, exact resume,
mismatched layouts, missing gradients, AMP overflow skipped on every rank alike."""

from __future__ import annotations

import pytest
import torch

import tests.codecs  # noqa: F401  (registers the 'test-sign' compressor in every rank)
from sparsecoll.collectives.lazy import LazyState
from sparsecoll.torch import SparseCollOptimizer, init_group
from tests.ranks import run_ranks

NO_GROUP = {"group_kwargs": None}


def net(seed: int = 0, hidden: int = 16) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 8, generator=generator), torch.randint(0, 3, (6,), generator=generator)


def train(model, optimizer, steps: range, rank: int) -> list[float]:
    losses = []
    for step in steps:
        optimizer.zero_grad()
        features, labels = batch(step, rank)
        loss = torch.nn.functional.cross_entropy(model(features), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def train_amp_or_plain(model, optimizer, steps: range, scaler=None) -> None:
    """``train`` on rank 0's batches, through ``scaler`` (AMP's loss scaling, no autocast) when given."""
    for step in steps:
        optimizer.zero_grad()
        features, labels = batch(step, 0)
        loss = torch.nn.functional.cross_entropy(model(features), labels)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def dense_matches_sgd(rank: int, world: int) -> float:
    torch.set_num_threads(1)
    with init_group(timeout=60, kernel_threads=1) as sync:
        model = net()
        options = dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
        optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), **options), sync, "dense")
        train(model, optimizer, range(5), rank)
    reference = net()
    sgd = torch.optim.SGD(reference.parameters(), **options)
    for step in range(5):
        sgd.zero_grad()
        for other in range(world):  # the mean over ranks of each rank's mean loss
            features, labels = batch(step, other)
            (torch.nn.functional.cross_entropy(reference(features), labels) / world).backward()
        sgd.step()
    return float((flat_params(model) - flat_params(reference)).abs().max())


def test_dense_equals_torch_sgd_on_the_mean_gradient() -> None:
    for difference in run_ranks(2, dense_matches_sgd, timeout=90, **NO_GROUP):
        assert difference < 1e-5


CONFIGS = [("gtopk", 0.05, {}), ("allgather", 0.05, {"quantize_bits": 8}), ("sketch", 0.1, {}),
           ("cltk", 0.05, {"clip_norm": 1.0}), ("dense", 1.0, {"lazy": LazyState()}),
           ("dense", 1.0, {"quantize_bits": 4, "lazy": LazyState()}), ("cltk", 0.05, {"quantize_bits": 8}),
           ("sketch", 0.1, {"quantize_bits": 8}), ("allgather", 0.05, {"lazy": LazyState(threshold=0.5)}),
           ("auto", 0.05, {})]


def replicas_after(rank: int, world: int) -> list:
    torch.set_num_threads(1)
    results = []
    with init_group(timeout=60, kernel_threads=1) as sync:
        for algorithm, density, extra in CONFIGS:
            model = net(hidden=64)
            optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sync,
                                            algorithm, density, warmup_steps=3, **extra)
            train(model, optimizer, range(8), rank)
            results.append((flat_params(model).tolist(), optimizer.last_stats.bytes_sent))
    return results


def test_replicas_stay_identical_with_every_algorithm() -> None:
    per_rank = run_ranks(3, replicas_after, timeout=90, **NO_GROUP)
    for position, (algorithm, _, _) in enumerate(CONFIGS):
        first = per_rank[0][position][0]
        assert all(ranked[position][0] == first for ranked in per_rank), algorithm
        assert all(ranked[position][1] > 0 for ranked in per_rank), algorithm


def resume(rank: int, world: int, directory: str) -> tuple[list[float], list[float]]:
    torch.set_num_threads(1)
    with init_group(timeout=60, kernel_threads=1) as sync:
        def build():
            model = net(hidden=32)
            inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
            return model, SparseCollOptimizer(inner, sync, "gtopk", 0.02, warmup_steps=4)

        model, optimizer = build()
        straight = train(model, optimizer, range(12), rank)
        model, optimizer = build()
        first_half = train(model, optimizer, range(6), rank)
        path = f"{directory}/rank{rank}.pt"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
        del model, optimizer
        model, optimizer = build()
        saved = torch.load(path)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        resumed = first_half + train(model, optimizer, range(6, 12), rank)
        state = optimizer.state_dict()
        state["sparsecoll"]["rank"] = 1 - rank
        with pytest.raises(ValueError, match="must load its own file"):
            optimizer.load_state_dict(state)
        return straight, resumed


def test_resume_continues_exactly_and_each_rank_loads_its_own(tmp_path) -> None:
    for straight, resumed in run_ranks(2, resume, str(tmp_path), timeout=90, **NO_GROUP):
        assert straight == resumed


def mismatched(rank: int, world: int) -> list:
    torch.set_num_threads(1)
    outcomes = []
    for kind in ("shape", "count", "dtype"):
        if kind == "shape":
            model = net(hidden=16 if rank == 0 else 17)
        elif kind == "count":
            model = net() if rank == 0 else torch.nn.Sequential(net(), torch.nn.Linear(3, 3))
        else:
            model = net().to(torch.float64 if rank == 1 else torch.float32)
        try:
            with init_group(timeout=30, kernel_threads=1, name=kind) as sync:
                optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync, "gtopk", 0.1)
                features, labels = batch(0, rank)
                dtype = next(model.parameters()).dtype
                torch.nn.functional.cross_entropy(model(features.to(dtype)), labels).backward()
                optimizer.step()
        except Exception as error:
            outcomes.append((type(error).__name__, str(error)))
        else:
            outcomes.append(("no error", ""))
    return outcomes


def test_mismatched_parameters_fail_on_every_rank() -> None:
    for outcomes in run_ranks(3, mismatched, timeout=90, **NO_GROUP):
        assert [name for name, _ in outcomes] == ["CollectiveMismatchError"] * 3, outcomes
        assert all("differ across ranks" in message for _, message in outcomes)


def unused_on_one_rank(rank: int, world: int) -> tuple[list, bool]:
    torch.set_num_threads(1)
    with init_group(timeout=60, kernel_threads=1) as sync:
        torch.manual_seed(0)
        trunk, head_a, head_b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)
        params = [*trunk.parameters(), *head_a.parameters(), *head_b.parameters()]
        optimizer = SparseCollOptimizer(torch.optim.SGD(params, lr=0.1), sync, "allgather", 0.2)
        optimizer.zero_grad()
        for p in params:
            p.grad = None
        features, labels = batch(0, rank)
        head = head_a if rank == 0 else head_b  # head_b's grad is None on rank 0
        torch.nn.functional.cross_entropy(head(trunk(features)), labels).backward()
        optimizer.step()
        return torch.cat([p.detach().reshape(-1) for p in params]).tolist(), head_b.bias.grad is not None


def test_missing_gradient_on_one_rank_counts_as_zero() -> None:
    (params0, has_grad0), (params1, has_grad1) = run_ranks(2, unused_on_one_rank, timeout=60, **NO_GROUP)
    assert params0 == params1 and has_grad0 and has_grad1


def amp_overflow(rank: int, world: int) -> tuple:
    torch.set_num_threads(1)
    with init_group(timeout=60, kernel_threads=1) as sync:
        model = net()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sync,
                                        "gtopk", 0.1, grad_scaler=scaler)
        scales = []
        for step in range(6):
            optimizer.zero_grad()
            features, labels = batch(step, rank)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(features), labels)
            if step == 3 and rank == 1:
                loss = loss * float("inf")  # only rank 1 overflows
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scales.append(scaler.get_scale())
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        return flat_params(model).tolist(), optimizer.steps, optimizer.skipped_steps, scales, finite


def test_amp_overflow_on_one_rank_skips_the_step_everywhere() -> None:
    results = run_ranks(2, amp_overflow, timeout=60, **NO_GROUP)
    (params0, steps0, skipped0, scales0, finite0), (params1, steps1, skipped1, scales1, finite1) = results
    assert finite0 and finite1
    assert (steps0, skipped0) == (steps1, skipped1) == (5, 1)
    assert params0 == params1
    assert scales0 == scales1 and scales0[3] == scales0[2] / 2


def test_amp_clips_the_unscaled_gradient() -> None:
    """Under a GradScaler the gradients arrive multiplied by the loss scale; local clipping must
    measure them unscaled, so the steps equal those of the same run without a scaler. And each
    step clips by its own gradient's norm: the first step already differs from an unclipped one."""
    import torch.distributed as dist

    from sparsecoll.sync import init_sync_group

    def run(scaler, clip_norm: float | None, steps: int) -> torch.Tensor:
        model = net()
        optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sync,
                                        "gtopk", 0.1, clip_norm=clip_norm, grad_scaler=scaler)
        train_amp_or_plain(model, optimizer, range(steps), scaler)
        return flat_params(model)

    with init_sync_group(store=dist.HashStore(), rank=0, world_size=1, timeout=10) as sync:
        amp = run(torch.amp.GradScaler("cpu", init_scale=2.0 ** 10), 0.05, 3)
        plain = run(None, 0.05, 3)
        first_clipped, first_unclipped = run(None, 0.05, 1), run(None, None, 1)
    assert torch.equal(amp, plain)
    assert not torch.equal(first_clipped, first_unclipped)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_clipping_reads_the_norm_and_still_skips_a_nonfinite_step(bad: float) -> None:
    """With clip_norm the NaN/inf check is the clipping norm's read: a bad value must still skip."""
    import torch.distributed as dist

    from sparsecoll.sync import init_sync_group

    with init_sync_group(store=dist.HashStore(), rank=0, world_size=1, timeout=10) as sync:
        model = net()
        optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync, "gtopk", 0.1,
                                        clip_norm=0.05)
        before = flat_params(model)
        features, labels = batch(0, 0)
        torch.nn.functional.cross_entropy(model(features), labels).backward()
        next(model.parameters()).grad[0, 0] = bad
        optimizer.step()
        assert optimizer.skipped_steps == 1 and torch.equal(flat_params(model), before)
        assert optimizer.clip_squared_norm is not None  # the check was the norm's read


def test_sign_codec_trains_through_the_optimizer_by_name():
    results = run_ranks(2, _train_sign, timeout=120, **NO_GROUP)
    first, second = results
    assert first["params"] == second["params"]  # every rank applied the same update
    assert first["loss"][-1] < 0.5 * first["loss"][0]


def _train_sign(rank, world):
    torch.manual_seed(0)
    features = torch.randn(256, 10)
    target = features @ torch.linspace(-1, 1, 10)
    model = torch.nn.Linear(10, 1)
    with init_group(timeout=60, kernel_threads=1) as group:
        opt = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), group, "test-sign",
                                  dense_if=None)
        losses = []
        for step in range(60):
            batch = slice(64 * ((step + rank) % 4), 64 * ((step + rank) % 4 + 1))
            loss = torch.nn.functional.mse_loss(model(features[batch]).squeeze(1), target[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return {"loss": losses, "params": [p.detach().numpy().tolist() for p in model.parameters()]}
