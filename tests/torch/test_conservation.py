"""Nothing is lost or counted twice: conservation through the optimizer and the DDP hook on 3 ranks.

For every builtin algorithm (plus quantized, lazy and momentum-corrected variants) each rank
records, per bucket and step, the gradient that went in and its error-feedback state before and
after. What a rank sent is then reconstructed as

    sent = residual_before + corrected_gradient - residual_after

(``corrected_gradient`` is the gradient itself, or DGC's momentum ``m u + g`` with momentum
correction; under ScaleCom's filter, the default for CLT-k, the memory's low pass is undone
first: see :func:`sent`), and the parent checks, on every step and bucket:

1. the sum over ranks of what each sent equals the global result (so a residual that subtracts
   the global result, or anything else than this rank's share, is caught: it makes every rank's
   "sent" the whole result, P times too much);
2. each rank's ``.grad`` (the hook's returned buffer) equals that global result divided by P,
   bit for bit the same on every rank (a dropped division is off by a factor of P).

Lazy variants reuse stale contributions, so for them the check is that the result equals the sum
of every rank's last *sent* contribution (the state the lazy rule keeps) and that the ranks did
skip. The quantized dense allreduce keeps no residual (its ring re-quantizes partial sums), so
it is checked against the dense sum within its rounding error.

One spawn of 3 ranks runs every configuration, first through SparseCollOptimizer, then through
DDP with the comm hook, to keep the suite's time small.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sparsecoll.collectives.lazy import LazyState
from sparsecoll.errors import SparseCollError
from sparsecoll.torch import CommHookState, SparseCollOptimizer, comm_hook, init_group
from tests.ranks import run_ranks

WORLD = 3
STEPS = 4
MOMENTUM = 0.9

OPTIMIZER_CONFIGS = {
    "dense": ("dense", 1.0, {}),
    "allgather": ("allgather", 0.05, {}),
    "gtopk": ("gtopk", 0.05, {}),
    "sketch": ("sketch", 0.1, {}),
    "cltk": ("cltk", 0.05, {}),
    "allgather-q8": ("allgather", 0.05, {"quantize_bits": 8}),
    "gtopk-q4": ("gtopk", 0.05, {"quantize_bits": 4}),
    "sketch-q8": ("sketch", 0.1, {"quantize_bits": 8}),
    "cltk-q8": ("cltk", 0.05, {"quantize_bits": 8}),
    "dense-q8": ("dense", 1.0, {"quantize_bits": 8}),
    "gtopk-momentum": ("gtopk", 0.05, {"momentum_correction": True}),
    "dense-lazy": ("dense", 1.0, {"lazy": LazyState(threshold=0.5)}),
    "dense-lazy-q8": ("dense", 1.0, {"lazy": LazyState(threshold=0.5), "quantize_bits": 8}),
    "allgather-lazy": ("allgather", 0.05, {"lazy": LazyState(threshold=1.5)}),
    "oktopk": ("oktopk", 0.05, {"algorithm_options": {"interval": 2}}),
    "oktopk-q4": ("oktopk", 0.05, {"quantize_bits": 4}),
}
HOOK_CONFIGS = {
    "hook-dense": ("dense", 1.0, {}),
    "hook-allgather": ("allgather", 0.05, {}),
    "hook-gtopk": ("gtopk", 0.05, {}),
    "hook-sketch": ("sketch", 0.1, {}),
    "hook-cltk": ("cltk", 0.05, {}),
    "hook-gtopk-q8": ("gtopk", 0.05, {"quantize_bits": 8}),
    "hook-allgather-momentum": ("allgather", 0.05, {"momentum": MOMENTUM}),
    "hook-oktopk": ("oktopk", 0.05, {"algorithm_options": {"interval": 2}}),
}
LAZY = {"dense-lazy", "dense-lazy-q8", "allgather-lazy"}
REQUANTIZED = {"dense-q8": 8, "gtopk-q4": 4, "sketch-q8": 8, "cltk-q8": 8, "hook-gtopk-q8": 8}
"""Quantized algorithms whose partial sums are rounded again on the way (ring, merges): no rank's
residual holds that rounding, so their result matches the ranks' contributions within it."""


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 48), torch.nn.Tanh(), torch.nn.Linear(48, 3))


def batch(step: int, rank: int, fixed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-specific data; ``fixed`` repeats step 0's batch (so lazy ranks find little change)."""
    generator = torch.Generator().manual_seed(1000 * (0 if fixed else step) + rank)
    return torch.randn(6, 8, generator=generator), torch.randint(0, 3, (6,), generator=generator)


def _numpy(tensor: torch.Tensor | None, like: torch.Tensor) -> np.ndarray:
    return (torch.zeros_like(like) if tensor is None else tensor).detach().double().numpy().copy()


def optimizer_records(rank: int, sync, algorithm: str, density: float, extra: dict) -> dict:
    """Per step and bucket: gradient in, residual/momentum before and after, .grad after."""
    extra = dict(extra)
    momentum_correction = extra.pop("momentum_correction", False)
    model = net()
    inner = torch.optim.SGD(model.parameters(), lr=0.01 if "lazy" in extra else 0.1,
                            momentum=MOMENTUM if momentum_correction else 0.0)
    optimizer = SparseCollOptimizer(inner, sync, algorithm, density, momentum_correction=momentum_correction,
                                    **extra)
    steps = []
    for step in range(STEPS):
        optimizer.zero_grad()
        features, labels = batch(step, rank, fixed="lazy" in extra)
        torch.nn.functional.cross_entropy(model(features), labels).backward()
        buckets = []
        for bucket, memory in zip(optimizer.buckets, optimizer.memories):
            bucket.gather_grads()
            buckets.append({"grad_in": _numpy(bucket.flat, bucket.flat),
                            "residual_before": _numpy(memory.residual, bucket.flat),
                            "momentum_before": _numpy(memory.momentum, bucket.flat)})
        optimizer.step()
        for record, bucket, memory, lazy in zip(buckets, optimizer.buckets, optimizer.memories,
                                                optimizer.lazy_states):
            record["residual_after"] = _numpy(memory.residual, bucket.flat)
            record["grad_out"] = np.concatenate([_numpy(p.grad, p).reshape(-1) for p in bucket.params])
            record["sparse"] = bucket.compressed
            if lazy is not None:
                record["lazy_skipped"] = lazy.skipped
                record["lazy_last_sent"] = None if lazy.last_sent is None else lazy.last_sent.astype(np.float64)
                record["lazy_contributions"] = lazy.contributions and [
                    (np.asarray(i, np.int64), np.asarray(v, np.float64)) for i, v in lazy.contributions]
        steps.append(buckets)
    return {"steps": steps, "momentum": MOMENTUM if momentum_correction else 0.0,
            "memory_beta": optimizer.compression.filter_factor()}


def hook_records(rank: int, sync, algorithm: str, density: float, extra: dict) -> dict:
    """The same records through DDP: the hook's buffer in, its memory, and the future's value."""
    extra = dict(extra)
    momentum = extra.pop("momentum", 0.0)
    model = DistributedDataParallel(net())
    state = CommHookState(sync, algorithm, density, momentum=momentum, **extra)
    records: dict[int, list] = {}

    def recording_hook(hook_state, bucket):  # unannotated: DDP checks annotations as objects
        index = bucket.index()
        buffer = bucket.buffer()
        grad_in = _numpy(buffer, buffer)
        memory = hook_state.memories.get(index)
        before = (None, None) if memory is None else (_numpy(memory.residual, buffer),
                                                      _numpy(memory.momentum, buffer))

        def finished(future: torch.futures.Future) -> torch.Tensor:
            result = future.value()
            now = hook_state.memories[index]
            residual_before, momentum_before = before if now is memory else (None, None)  # rebuilt: fresh
            records.setdefault(index, []).append({
                "grad_in": grad_in,
                "residual_before": np.zeros_like(grad_in) if residual_before is None else residual_before,
                "momentum_before": np.zeros_like(grad_in) if momentum_before is None else momentum_before,
                "residual_after": _numpy(now.residual, result), "grad_out": _numpy(result, result),
                "sparse": True})
            return result

        return comm_hook(hook_state, bucket).then(finished)

    model.register_comm_hook(state, recording_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        optimizer.zero_grad()
        features, labels = batch(step, rank, fixed=False)
        torch.nn.functional.cross_entropy(model(features), labels).backward()
        optimizer.step()
    state.close()
    steps = [[records[index][step] for index in sorted(records)] for step in range(STEPS)]
    return {"steps": steps, "momentum": momentum, "memory_beta": state.compression.filter_factor()}


def conservation_rank(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    try:
        with init_group(timeout=60, kernel_threads=1) as sync:
            for name, (algorithm, density, extra) in OPTIMIZER_CONFIGS.items():
                results[name] = optimizer_records(rank, sync, algorithm, density, extra)
            for name, (algorithm, density, extra) in HOOK_CONFIGS.items():
                results[name] = hook_records(rank, sync, algorithm, density, extra)
    finally:
        dist.destroy_process_group()
    return results


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    results = run_ranks(WORLD, conservation_rank, timeout=240, group_kwargs=None)
    errors = [result for result in results if isinstance(result, SparseCollError)]
    assert not errors, errors  # a rank's returned error fails the test
    return results


def sent(record: dict, momentum: float, memory_beta: float = 1.0) -> np.ndarray:
    """What a rank contributed: residual before + (momentum-corrected) gradient - residual after.

    Under ScaleCom's filter the memory after is ``(1-beta) m + beta (p - sent)`` with
    ``p = m + corrected``, so ``sent = p - (after - (1-beta) m) / beta`` (beta = 1: plain).
    """
    corrected = record["grad_in"] + momentum * record["momentum_before"] if momentum else record["grad_in"]
    before = record["residual_before"]
    kept = (record["residual_after"] - (1.0 - memory_beta) * before) / memory_beta
    return before + corrected - kept


def dense_of(contributions: list, size: int) -> np.ndarray:
    total = np.zeros(size)
    for indices, values in contributions:
        np.add.at(total, indices, values)
    return total


@pytest.mark.slow
@pytest.mark.parametrize("name", [*OPTIMIZER_CONFIGS, *HOOK_CONFIGS])
def test_sum_of_what_ranks_sent_is_the_result_and_grad_is_its_mean(per_rank: list[dict], name: str) -> None:
    momentum = per_rank[0][name]["momentum"]
    memory_beta = per_rank[0][name]["memory_beta"]
    skipped = 0
    for step in range(STEPS):
        for position, first in enumerate(per_rank[0][name]["steps"][step]):
            records = [ranked[name]["steps"][step][position] for ranked in per_rank]
            where = f"{name}, step {step}, bucket {position}"
            mean = first["grad_out"]
            for record in records[1:]:  # every replica applies the same update
                np.testing.assert_array_equal(record["grad_out"], mean, err_msg=where)
            assert np.abs(mean).max() > 0, where
            global_result = mean * WORLD
            if name in LAZY and "lazy_last_sent" in first and first["sparse"] and "allgather" in name:
                total = dense_of(first["lazy_contributions"], mean.size)
                skipped += sum(record["lazy_skipped"] for record in records)
            elif name in LAZY and first.get("lazy_last_sent") is not None:
                total = sum(record["lazy_last_sent"] for record in records)
                skipped += sum(record["lazy_skipped"] for record in records)
            elif name in REQUANTIZED:
                contributions = [sent(record, momentum, memory_beta) for record in records]
                total = sum(contributions)
                largest = max(np.abs(part).max() for part in [total, *contributions])
                rounding = 2 * WORLD * largest / (2 ** (REQUANTIZED[name] - 1) - 1)  # WORLD roundings at most
                assert np.abs(global_result - total).max() <= rounding, where
                continue
            else:
                total = sum(sent(record, momentum, memory_beta) for record in records)
            np.testing.assert_allclose(global_result, total, rtol=1e-4, atol=1e-5 * np.abs(total).max(),
                                       err_msg=where)
    if name in LAZY:
        assert skipped > 0, f"{name}: no rank ever skipped, so reuse was never exercised"
