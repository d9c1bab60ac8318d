"""``hierarchical=True`` through SparseCollOptimizer and the DDP hook, on 2 emulated hosts x 2 ranks.

The conservation checks of tests/torch/test_conservation.py, on two-level reductions: what the
ranks sent (residual before + gradient - residual after) sums to the global result, and every
replica applies the same update. That the two levels ran shows in the bytes: the flat ring of
ranks 0-1-2-3 never sends from rank 0 or 2 to the other host, while in two levels every rank
sends its shard's traffic to the other host.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from sparsecoll.errors import SparseCollError
from sparsecoll.torch import SparseCollOptimizer, init_group
from sparsecoll.torch.exchange import Compression, with_hierarchical
from tests.ranks import run_ranks
from tests.torch.test_conservation import STEPS, batch, hook_records, net, optimizer_records, sent

WORLD = 4
HOSTS = ("a", "a", "b", "b")
OPTIMIZER_CONFIGS = {"dense": ("dense", 1.0), "allgather": ("allgather", 0.05), "gtopk": ("gtopk", 0.05),
                     "cltk": ("cltk", 0.05)}
HOOK_CONFIGS = {"hook-gtopk": ("gtopk", 0.05), "hook-dense": ("dense", 1.0)}
RING_LIKE = {"dense", "allgather", "hook-dense"}
"""Flat, these are rings 0-1-2-3-0, where ranks 0 and 2 send only inside their host."""


def bucket_inter_bytes(rank: int, sync, hierarchical: bool) -> int:
    """Bytes this rank sent to the other host in one allgather step's bucket reductions."""
    model = net()
    optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync, "allgather", 0.05,
                                    dense_if=None, hierarchical=hierarchical)
    features, labels = batch(0, rank, fixed=False)
    torch.nn.functional.cross_entropy(model(features), labels).backward()
    optimizer.step()
    return optimizer.last_stats.inter_host_bytes_sent


def training_rank(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    try:
        with init_group(timeout=60, kernel_threads=1) as sync:
            for name, (algorithm, density) in OPTIMIZER_CONFIGS.items():
                results[name] = optimizer_records(rank, sync, algorithm, density, {"hierarchical": True})
            for name, (algorithm, density) in HOOK_CONFIGS.items():
                results[name] = hook_records(rank, sync, algorithm, density, {"hierarchical": True})
            results["inter_sent"] = {mode: bucket_inter_bytes(rank, sync, mode) for mode in (True, False)}
    finally:
        dist.destroy_process_group()
    return results


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    env = {rank: {"SPARSECOLL_HOST_ID": host} for rank, host in enumerate(HOSTS)}
    results = run_ranks(WORLD, training_rank, timeout=300, group_kwargs=None, per_rank_env=env)
    errors = [result for result in results if isinstance(result, SparseCollError)]
    assert not errors, errors
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", [*OPTIMIZER_CONFIGS, *HOOK_CONFIGS])
def test_two_level_training_conserves_what_ranks_sent(per_rank: list[dict], name: str) -> None:
    momentum, memory_beta = per_rank[0][name]["momentum"], per_rank[0][name]["memory_beta"]
    for step in range(STEPS):
        for position, first in enumerate(per_rank[0][name]["steps"][step]):
            records = [ranked[name]["steps"][step][position] for ranked in per_rank]
            where = f"{name}, step {step}, bucket {position}"
            for record in records[1:]:
                np.testing.assert_array_equal(record["grad_out"], first["grad_out"], err_msg=where)
            total = sum(sent(record, momentum, memory_beta) for record in records)
            assert np.abs(total).max() > 0, where
            np.testing.assert_allclose(first["grad_out"] * WORLD, total, rtol=1e-4,
                                       atol=1e-5 * np.abs(total).max(), err_msg=where)


@pytest.mark.slow
def test_every_rank_sent_to_the_other_host(per_rank: list[dict]) -> None:
    assert [ranked["inter_sent"][True] > 0 for ranked in per_rank] == [True] * WORLD
    assert [ranked["inter_sent"][False] > 0 for ranked in per_rank] == [False, True, False, True]


@pytest.mark.parametrize("algorithm, hierarchical, bits, refused", [
    ("gtopk", True, None, False), ("cltk", "auto", None, False), ("sketch", "auto", None, False),
    ("gtopk", "auto", 8, False), ("sketch", True, None, True), ("gtopk", True, 8, True), ("gtopk", "yes", None, True),
])
def test_hierarchical_options_checked_when_built(algorithm: str, hierarchical, bits, refused: bool) -> None:
    def build() -> Compression:
        compression = Compression(algorithm, 0.01, bits, options=with_hierarchical(None, hierarchical))
        compression.validate()
        return compression

    if refused:
        with pytest.raises(ValueError, match="hierarchical"):
            build()
    else:
        assert build().options == {"hierarchical": hierarchical}
