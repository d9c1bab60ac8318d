"""The papers' rules through the DDP comm hook's state (CommHookState), on 2 real ranks with DDP.

ScaleCom's filter on the hook's error-feedback memory: the memory after a step is
``(1 - beta) m + beta (p - C(p))`` with ``p = m + g``, the paper's beta = 0.1 by default for CLT-k
and plain error feedback (``p - C(p)``) for an explicit ``memory_beta=1.0``. Random-k (unbiased)
with error feedback is refused with the reason; by default it runs without it. One spawn runs
every case.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sparsecoll.torch import CommHookState, comm_hook, init_group
from tests.ranks import run_ranks

WORLD, STEPS, DENSITY = 2, 4, 0.05
HOOK_CASES = {
    "cltk-default": ("cltk", {}),
    "cltk-plain": ("cltk", {"memory_beta": 1.0}),
    "randomk-default": ("allgather", {"algorithm_options": {"selection": "randomk"}}),
}
REFUSED = {
    "randomk-ef": ("allgather", {"algorithm_options": {"selection": "randomk"}, "error_feedback": True}),
    "randomk-compressor-ef": ("randomk", {"error_feedback": True}),
    "beta-zero": ("cltk", {"memory_beta": 0.0}),
    "beta-above-one": ("cltk", {"memory_beta": 1.5}),
}


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))


def hook_steps(rank: int, sync, algorithm: str, options: dict) -> dict:
    """Per compressed step and bucket: memory before (m), gradient in (g), memory after, result."""
    model = DistributedDataParallel(net())
    state = CommHookState(sync, algorithm, DENSITY, **options)
    records: list[dict] = []

    def recording_hook(hook_state, bucket):  # unannotated: DDP checks annotations as objects
        index, buffer = bucket.index(), bucket.buffer()
        grad_in = buffer.detach().clone()
        memory = hook_state.memories.get(index)
        before = None if memory is None else memory.residual.detach().clone()

        def finished(future: torch.futures.Future) -> torch.Tensor:
            result = future.value()
            now = hook_state.memories.get(index)
            if now is not None and hook_state.iteration > hook_state.start_iter:  # a compressed step
                records.append({"m": torch.zeros_like(grad_in) if before is None or now is not memory else before,
                                "g": grad_in, "after": now.residual.detach().clone(),
                                "result": result.detach().clone()})
            return result

        return comm_hook(hook_state, bucket).then(finished)

    model.register_comm_hook(state, recording_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(1000 * step + rank)
        optimizer.zero_grad()
        features, labels = torch.randn(8, 16, generator=generator), torch.randint(0, 4, (8,), generator=generator)
        torch.nn.functional.cross_entropy(model(features), labels).backward()
        optimizer.step()
    state.close()
    return {"beta": state.compression.filter_factor(), "error_feedback": state.compression.error_feedback,
            "records": [{key: value.double().numpy() for key, value in record.items()} for record in records]}


def paper_rules_rank(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results: dict = {"refused": {}, "default_beta": {}}
    try:
        with init_group(timeout=60, kernel_threads=1) as sync:
            for name, (algorithm, options) in REFUSED.items():
                try:
                    CommHookState(sync, algorithm, DENSITY, **options)
                except ValueError as error:
                    results["refused"][name] = str(error)
            for algorithm in ("cltk", "gtopk", "allgather"):
                results["default_beta"][algorithm] = CommHookState(sync, algorithm, DENSITY).compression.filter_factor()
            results["masking"] = [CommHookState(sync, "gtopk", DENSITY, momentum=0.9, **options)
                                  .memory_for(0, torch.zeros(8), []).momentum_masking
                                  for options in ({}, {"momentum_masking": True})]
            for name, (algorithm, options) in HOOK_CASES.items():
                results[name] = hook_steps(rank, sync, algorithm, options)
    finally:
        dist.destroy_process_group()
    return results


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    return run_ranks(WORLD, paper_rules_rank, timeout=240, group_kwargs=None)


def filtered_memory(record: dict, beta: float) -> np.ndarray:
    """ScaleCom: (1 - beta) m + beta (p - C(p)), p = m + g, C(p) = p where anything was sent."""
    outgoing = record["m"] + record["g"]
    kept = np.where(record["result"] != 0, 0.0, outgoing)
    return (1.0 - beta) * record["m"] + beta * kept


def test_the_hooks_default_beta_is_the_papers_for_cltk_and_plain_for_the_others(per_rank) -> None:
    assert all(results["default_beta"] == {"cltk": 0.1, "gtopk": 1.0, "allgather": 1.0} for results in per_rank)


def test_the_hooks_memories_mask_momentum_only_when_asked(per_rank) -> None:
    assert all(results["masking"] == [False, True] for results in per_rank)


@pytest.mark.parametrize("name, beta", [("cltk-default", 0.1), ("cltk-plain", 1.0)])
def test_the_hooks_memory_after_a_step_is_scalecoms_filter_of_error_feedback(per_rank, name: str,
                                                                            beta: float) -> None:
    for rank, results in enumerate(per_rank):
        case = results[name]
        assert case["beta"] == beta and case["error_feedback"] is True
        assert len(case["records"]) >= STEPS - 1, name
        for step, record in enumerate(case["records"]):
            assert np.count_nonzero(record["result"]) < record["g"].size / 4  # sparse: the rule applies
            expected = filtered_memory(record, beta)
            np.testing.assert_allclose(record["after"], expected, rtol=1e-5, atol=1e-7 * np.abs(expected).max(),
                                       err_msg=f"{name}, rank {rank}, record {step}")
    # the filter changes the memory: the paper's beta keeps a tenth of what plain feedback keeps at first
    default, plain = (per_rank[0][name]["records"][0] for name in ("cltk-default", "cltk-plain"))
    np.testing.assert_allclose(default["after"], 0.1 * plain["after"], rtol=1e-5, atol=1e-9)
    assert np.abs(plain["after"]).max() > 0


def test_random_k_runs_without_error_feedback_by_default(per_rank) -> None:
    for results in per_rank:
        case = results["randomk-default"]
        assert case["error_feedback"] is False and case["records"]
        for record in case["records"]:
            assert np.abs(record["result"]).max() > 0
            assert not np.any(record["after"])  # nothing kept: the unbiased estimate is sent as is


@pytest.mark.parametrize("name, reason", [("randomk-ef", "unbiased"), ("randomk-compressor-ef", "unbiased"),
                                          ("beta-zero", "memory_beta"), ("beta-above-one", "memory_beta")])
def test_the_hook_refuses_what_its_paper_rules_out(per_rank, name: str, reason: str) -> None:
    for results in per_rank:
        assert reason in results["refused"].get(name, "(not refused)"), results["refused"]
