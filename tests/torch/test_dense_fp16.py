"""``dense_fp16``: the dense reductions (the warm-up's dense steps, dense buckets) travel as
float16, as torch's fp16 hook sends them: half the bytes, a mean within float16's rounding of the
float32 one, the same on every rank, and a mean past float16's range redone in float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsecoll.torch import CommHookState, SparseCollOptimizer, init_group
from sparsecoll.torch.error_feedback import ErrorFeedback
from sparsecoll.torch.exchange import Compression, reduce_buffer
from tests.ranks import run_ranks
from tests.torch.test_optimizer import batch, flat_params, net

OVERFLOW_AT, HUGE = 7, 1e6


def fp16_rank(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    with init_group(timeout=60, kernel_threads=1) as sync:
        outcome: dict = {}
        for fp16 in (False, True):
            model = net(hidden=64)
            optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sync,
                                            "gtopk", 0.01, warmup_steps=4, dense_fp16=fp16)
            features, labels = batch(0, rank)
            torch.nn.functional.cross_entropy(model(features), labels).backward()
            local = torch.cat([param.grad.reshape(-1) for param in model.parameters()])
            optimizer.step()  # the warm-up's first step: dense (and momentum's first is the gradient)
            mean = torch.cat([param.grad.reshape(-1) for param in model.parameters()])
            outcome[fp16] = (optimizer.last_stats.bytes_sent, mean.numpy().copy(), flat_params(model).numpy().copy(),
                             local.numpy())
        for bits in (None, 8):  # float16 dense steps beside quantized sparse ones
            model = net(hidden=2048)  # 24.6k parameters: the values outweigh the frames' headers
            optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sync,
                                            "allgather", 0.01, warmup_steps=2, dense_fp16=True, quantize_bits=bits)
            sent = []
            for step in range(3):  # densities 1 (dense), 0.1 and 0.01 (sparse)
                model.zero_grad()
                features, labels = batch(step, rank)
                torch.nn.functional.cross_entropy(model(features), labels).backward()
                optimizer.step()
                sent.append(optimizer.last_stats.bytes_sent)
            outcome[("quantized", bits)] = (sent, flat_params(model).numpy().copy())
        gradient = torch.full((1000,), 0.5)
        if rank == 1:
            gradient[OVERFLOW_AT] = HUGE  # its mean, (HUGE + 0.5) / 2, is past float16's 65504
        stats = sync.run(reduce_buffer(sync.group, gradient, ErrorFeedback(gradient), Compression("dense", 1.0,
                                       dense_fp16=True), density=1.0, step=0, seed=0))
        outcome["overflow"] = (gradient.numpy().copy(), stats.bytes_sent)
        outcome["hook"] = CommHookState(sync, "gtopk", 0.01, dense_fp16=True).compression.dense_fp16
        return outcome


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    return run_ranks(2, fp16_rank, timeout=120, group_kwargs=None)


def test_dense_steps_send_half_the_bytes_and_the_mean_to_float16_rounding(per_rank) -> None:
    full_bytes, full_mean, _, _ = per_rank[0][False]
    half_bytes, half_mean, _, _ = per_rank[0][True]
    assert half_bytes < 0.55 * full_bytes, (half_bytes, full_bytes)
    # each rank's gradient halved into float16, the two summed in float16 (numpy rounds a float16
    # sum once, in either order), as torch's fp16 hook computes it
    local = [np.float16(outcome[True][3] / 2) for outcome in per_rank]
    assert np.array_equal(half_mean, (local[0] + local[1]).astype(np.float32))
    assert not np.array_equal(half_mean, full_mean)  # it did round
    assert np.array_equal(per_rank[0][True][2], per_rank[1][True][2])  # replicas stay identical


def test_a_mean_past_float16s_range_is_redone_in_float32_on_every_rank(per_rank) -> None:
    expected = np.full(1000, 0.5, np.float32)
    expected[OVERFLOW_AT] = np.float32((np.float32(HUGE) + np.float32(0.5)) / 2)
    for outcome in per_rank:
        reduced, sent = outcome["overflow"]
        assert np.array_equal(reduced, expected)
        assert sent >= 1000 * (2 + 4)  # both attempts' bytes (a ring of two sends d values each): 2 and 4 a value


def test_the_hook_takes_it_too(per_rank) -> None:
    assert per_rank[0]["hook"] is True


@pytest.mark.parametrize("other", [{"quantize_bits": 8}, {"hierarchical": True}])
def test_it_refuses_another_wire_format_or_two_levels(other: dict) -> None:
    with pytest.raises(ValueError, match="dense_fp16"):
        Compression("dense", 1.0, dense_fp16=True, quantize_bits=other.get("quantize_bits"),
                    options={"hierarchical": True} if "hierarchical" in other else {}).validate()


@pytest.mark.parametrize("algorithm", ["allgather", "gtopk", "cltk"])
def test_a_sparse_algorithm_takes_it_with_quantized_values(algorithm: str) -> None:
    Compression(algorithm, 0.01, dense_fp16=True, quantize_bits=8).validate()


def test_dense_steps_go_float16_and_sparse_steps_quantized_in_one_run(per_rank) -> None:
    plain, _ = per_rank[0][("quantized", None)]
    quantized, _ = per_rank[0][("quantized", 8)]
    assert quantized[0] == plain[0]  # the dense step: float16 either way, 2 bytes a value
    assert 24_000 * 2 < plain[0] < 24_000 * 3
    # the sparse steps: 8-bit values (plus a scale a block) instead of 32-bit; at 10% density
    # the pairs dominate, at 1% the dense float16 biases do
    assert quantized[1] < 0.7 * plain[1] and quantized[2] < plain[2], (quantized, plain)
    assert np.array_equal(per_rank[0][("quantized", 8)][1], per_rank[1][("quantized", 8)][1])


def test_the_optimizer_refuses_it_with_lazy_rounds() -> None:
    import torch.distributed as dist

    from sparsecoll.collectives.lazy import LazyState
    from sparsecoll.sync import init_sync_group

    with init_sync_group(store=dist.HashStore(), rank=0, world_size=1, timeout=10) as sync:
        with pytest.raises(ValueError, match="dense_fp16 does not combine with lazy"):
            SparseCollOptimizer(torch.optim.SGD(net().parameters(), lr=0.1), sync, "dense", 1.0,
                                lazy=LazyState(), dense_fp16=True)

