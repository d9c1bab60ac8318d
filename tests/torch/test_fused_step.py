"""The fused step against the unfused one: same residuals, momentum, .grad and parameters.

One spawn of 2 ranks trains small MLPs under several settings twice: with the fused pass and
the sparse SGD update (the default), and with both switched off (``ErrorFeedback.fusable`` and
``sparse_sgd_applies`` patched to False: the separate torch ops and the wrapped SGD's dense step
over the zero-filled gradient). Without weight decay, clipping or ScaleCom's filter the two are
equal bit for bit; with them, to float32 rounding (torch folds ``g + wd * p`` with one fused
multiply-add, and the fused pass filters ``beta p + (1 - beta) m`` before the sent part leaves
where the unfused path filters ``beta (p - sent) + (1 - beta) m`` after).

The same spawn also checks that a one-parameter bucket reading autograd's gradient where it is
(its buffer only receiving results) gives the ``.grad`` and parameters of the path that copies
the gradient in, bit for bit, also when the previous step's k entries must be cleared and when
user code wrote to ``.grad`` between steps (the buffer's version moved, so it is zeroed whole).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsecoll.torch import SparseCollOptimizer, init_group
from sparsecoll.torch import optimizer as optimizer_module
from sparsecoll.torch.buckets import Bucket
from sparsecoll.torch.error_feedback import ErrorFeedback, clip_local, clip_scale
from tests.ranks import run_ranks

STEPS = 4
CONFIGS = {
    # name: (algorithm, density, SGD settings, wrapper settings, bit-exact)
    "gtopk-momentum": ("gtopk", 0.02, {"momentum": 0.9}, {}, True),
    "gtopk-nesterov": ("gtopk", 0.02, {"momentum": 0.9, "nesterov": True}, {}, True),
    "allgather-plain": ("allgather", 0.02, {}, {"momentum_correction": False}, True),
    "cltk-scalecom": ("cltk", 0.02, {"momentum": 0.9}, {}, False),
    "gtopk-beta-half": ("gtopk", 0.02, {"momentum": 0.9}, {"memory_beta": 0.5}, False),
    "gtopk-bf16-wide": ("gtopk", 0.02, {"momentum": 0.9}, {"residual_dtype": torch.float32, "bf16": True}, True),
    "gtopk-decay-clip": ("gtopk", 0.02, {"momentum": 0.9, "weight_decay": 1e-2}, {"clip_norm": 0.5}, False),
    "gtopk-warmup": ("gtopk", 0.02, {"momentum": 0.9}, {"warmup_steps": 3}, True),
    "gtopk-masked": ("gtopk", 0.02, {"momentum": 0.9}, {"momentum_masking": True}, True),
    "gtopk-beta-masked": ("gtopk", 0.02, {"momentum": 0.9}, {"memory_beta": 0.5, "momentum_masking": True}, False),
}


def net(bf16: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 256), torch.nn.Tanh(), torch.nn.Linear(256, 4))
    return model.to(torch.bfloat16) if bf16 else model


def train(rank: int, sync, config: tuple) -> dict:
    algorithm, density, sgd, extra, _ = config
    extra = dict(extra)
    bf16 = extra.pop("bf16", False)
    model = net(bf16)
    optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, **sgd), sync, algorithm, density,
                                    **extra)
    grads, residuals, momenta, params = [], [], [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        generator = torch.Generator().manual_seed(100 * step + rank)
        features = torch.randn(8, 300, generator=generator).to(next(model.parameters()).dtype)
        loss = torch.nn.functional.cross_entropy(model(features).float(), torch.randint(0, 4, (8,), generator=generator))
        loss.backward()
        optimizer.step()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).float().numpy().copy())
        residuals.append([m.residual.float().numpy().copy() for m in optimizer.memories])
        momenta.append([None if m.momentum is None else m.momentum.float().numpy().copy() for m in optimizer.memories])
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).float().numpy())
    return {"params": params, "grads": grads, "residuals": residuals, "momenta": momenta}


def both_ways(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    results = {}
    with init_group(timeout=120, kernel_threads=1) as sync:
        for name, config in CONFIGS.items():
            fused_run = train(rank, sync, config)
            saved = ErrorFeedback.fusable, optimizer_module.sparse_sgd_applies
            ErrorFeedback.fusable = lambda self, grad: False
            optimizer_module.sparse_sgd_applies = lambda *args: False
            try:
                unfused_run = train(rank, sync, config)
            finally:
                ErrorFeedback.fusable, optimizer_module.sparse_sgd_applies = saved
            results[name] = (fused_run, unfused_run)
        results["in_place"] = train_source(rank, sync, 0.05)
        saved = Bucket._readable_in_place
        Bucket._readable_in_place = lambda self, grad: False
        try:
            results["copied"] = train_source(rank, sync, 0.05)
        finally:
            Bucket._readable_in_place = saved
    return results


SOURCE_STEPS = 5
SCRIBBLE_AFTER = 2
"""After this step user code adds 1 to every ``.grad`` (before ``zero_grad``)."""


def train_source(rank: int, sync, density: float) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 60, bias=False), torch.nn.Tanh(), torch.nn.Linear(60, 3, bias=False))
    optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sync, "gtopk", density,
                                    bucket_bytes=40 * 60 * 4)  # a bucket a weight
    read_in_place, grads, params = [], [], []
    for step in range(SOURCE_STEPS):
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


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    return run_ranks(2, both_ways, timeout=300, group_kwargs=None)


def compare(actual, expected, exact: bool, where: str) -> None:
    if actual is None or expected is None:
        assert actual is None and expected is None, where
    elif exact:
        np.testing.assert_array_equal(actual, expected, err_msg=where)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(expected).max()),
                                   err_msg=where)


@pytest.mark.parametrize("name", CONFIGS)
def test_fused_step_equals_unfused_step(per_rank: list[dict], name: str) -> None:
    exact = CONFIGS[name][4]
    for rank, results in enumerate(per_rank):
        fused_run, unfused_run = results[name]
        for step in range(STEPS):
            where = f"{name} rank {rank} step {step}"
            compare(fused_run["grads"][step], unfused_run["grads"][step], exact, where + " .grad")
            compare(fused_run["params"][step], unfused_run["params"][step], exact, where + " parameters")
            for bucket, (mine, theirs) in enumerate(zip(fused_run["residuals"][step], unfused_run["residuals"][step])):
                compare(mine, theirs, exact, f"{where} bucket {bucket} residual")
            for bucket, (mine, theirs) in enumerate(zip(fused_run["momenta"][step], unfused_run["momenta"][step])):
                compare(mine, theirs, exact, f"{where} bucket {bucket} momentum")
    bf16 = CONFIGS[name][3].get("bf16", False)
    initial = torch.cat([p.detach().reshape(-1) for p in net(bf16).parameters()]).float().numpy()
    assert not np.array_equal(per_rank[0][name][0]["params"][-1], initial), f"{name}: nothing was trained"
    np.testing.assert_array_equal(per_rank[0][name][0]["params"][-1], per_rank[1][name][0]["params"][-1])


def test_momentum_is_masked_where_sent_only_when_asked(per_rank: list[dict]) -> None:
    """DGC's masking zeroes the momentum of the last step's k sent coordinates (tanh: no exact
    zeros otherwise); by default the momentum keeps them (the fused pass settles both ways)."""
    for results in per_rank:
        for name, masked in (("gtopk-masked", True), ("gtopk-momentum", False)):
            for run in results[name]:
                momentum = run["momenta"][-1][0]
                k = int(0.02 * momentum.size)
                zeros = int((momentum == 0).sum())
                assert (zeros >= k // 2) if masked else (zeros < k // 10), (name, zeros, k)


def test_clip_scale_reads_each_buffer_once_and_matches_torch() -> None:
    buffers = [torch.randn(70_000), torch.randn(1000, dtype=torch.float64), torch.randn(500).to(torch.bfloat16)]
    expected = float(torch.sqrt(sum((b.double() ** 2).sum() for b in buffers)))
    norm, scale = clip_scale(buffers, 1.0, 4)
    assert norm == pytest.approx(expected, rel=1e-12)
    assert scale == pytest.approx(0.5 / (expected + 1e-6))
    assert clip_scale(buffers, 10 * expected, 1)[1] == 1.0
    copies = [b.clone() for b in buffers]
    assert clip_local(copies, 1.0, 4) == pytest.approx(expected, rel=1e-12)
    assert float(torch.sqrt(sum((b.double() ** 2).sum() for b in copies))) <= 0.5 * (1 + 1e-2)


def test_reading_the_gradient_in_place_equals_copying_it_bit_for_bit(per_rank: list[dict]) -> None:
    for outcome in per_rank:
        assert all(all(flags) for flags in outcome["in_place"]["read_in_place"])
        assert not any(any(flags) for flags in outcome["copied"]["read_in_place"])
        for step in range(SOURCE_STEPS):
            np.testing.assert_array_equal(outcome["in_place"]["grads"][step], outcome["copied"]["grads"][step],
                                          err_msg=f".grad after step {step}")
            np.testing.assert_array_equal(outcome["in_place"]["params"][step], outcome["copied"]["params"][step],
                                          err_msg=f"parameters after step {step}")


def test_grad_holds_only_this_steps_k_entries(per_rank: list[dict]) -> None:
    for outcome in per_rank:
        for grads in outcome["in_place"]["grads"]:
            assert 0 < np.count_nonzero(grads) <= 2 * int(0.05 * 40 * 60 + 0.05 * 60 * 3 + 2)
