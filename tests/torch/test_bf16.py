"""bfloat16 as it is: a wire dtype (2 bytes a value, against the formulas), every builtin algorithm on
bf16 gradients agreeing with float32, and a bf16 model whose buckets, residuals and momentum stay
bf16 (or float32 with residual_dtype=) while replicas stay identical."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from sparsecoll import kernels
from sparsecoll.torch import SparseCollOptimizer, init_group
from sparsecoll.torch.buckets import as_array, to_tensor
from sparsecoll.wire import HEADER_SIZE, dtype_code, dtype_from_code, sparse_payload_size
from tests.ranks import run_ranks
from tests.torch.test_optimizer import batch, flat_params, net

BF16 = np.dtype(ml_dtypes.bfloat16)
ALGORITHMS = ("dense", "allgather", "gtopk", "sketch", "cltk")
SIZE, DENSITY = 4000, 0.05


def test_bf16_is_a_wire_dtype_and_crosses_torch_without_a_copy() -> None:
    assert dtype_from_code(dtype_code(BF16)) == BF16
    tensor = torch.linspace(-3, 3, 7, dtype=torch.bfloat16)
    array = as_array(tensor)
    assert array.dtype == BF16 and array.ctypes.data == tensor.data_ptr()
    assert torch.equal(to_tensor(array, tensor), tensor)


def test_bf16_selection_keys_order_by_magnitude() -> None:
    values = np.array([0.5, -3.0, 2.0, -0.25, 1e-3, -2.5, 0.0, 7.0], np.float32)
    indices, selected = kernels.topk(values.astype(BF16), 3, method="exact")
    assert sorted(np.asarray(indices).tolist()) == [1, 5, 7]
    assert np.asarray(selected).dtype == BF16
    with pytest.raises(Exception, match="NaN or inf"):
        kernels.topk(np.array([1.0, np.nan, 2.0], np.float32).astype(BF16), 1, method="exact")


def algorithms_rank(rank: int, sync) -> dict:
    outcome = {}
    gradient = np.random.default_rng(rank).standard_normal(SIZE).astype(BF16)
    for algorithm in ALGORITHMS:
        for dtype in (BF16, np.dtype(np.float32)):
            result, stats = sync.run(sync.group.reduce_gradient(gradient.astype(dtype), algorithm,
                                                                 density=DENSITY, step=1))
            outcome[algorithm, dtype.name] = (np.asarray(result.dense(), np.float32), str(result.values.dtype),
                                              stats.bytes_sent, stats.frames_sent)
    return outcome


def both_rank(rank: int, world: int) -> tuple[dict, dict]:
    torch.set_num_threads(1)
    with init_group(timeout=60, kernel_threads=1) as sync:
        return algorithms_rank(rank, sync), bf16_model_rank(rank, sync)


@pytest.fixture(scope="module")
def per_rank() -> list:
    """One spawn of two ranks for both tests below."""
    return run_ranks(2, both_rank, timeout=180, group_kwargs=None)


def test_every_algorithm_reduces_bf16_as_float32_does_with_two_bytes_a_value(per_rank) -> None:
    world = 2
    first = per_rank[0][0]
    k = int(SIZE * DENSITY)
    for algorithm in ALGORITHMS:
        half, half_dtype, half_bytes, half_frames = first[algorithm, "bfloat16"]
        full, _, full_bytes, full_frames = first[algorithm, "float32"]
        assert half_dtype == "bfloat16", algorithm
        differ = ~np.isclose(half, full, rtol=2 ** -7, atol=2 ** -7)
        # the sketch picks its k among candidates by summed values: a near-tie may round either way
        assert differ.sum() <= (2 if algorithm == "sketch" else 0), (algorithm, np.flatnonzero(differ))
        assert half_frames == full_frames, algorithm
        if algorithm == "dense":  # a ring of two ranks: d/2 values each way, twice
            assert half_bytes == half_frames * HEADER_SIZE + 2 * (world - 1) * SIZE // world * 2
        if algorithm == "allgather":  # (P-1) sparse payloads of k (uint32 index, bf16 value)
            assert half_bytes == half_frames * HEADER_SIZE + (world - 1) * sparse_payload_size(k, SIZE, BF16, None)
            assert sparse_payload_size(k, SIZE, BF16, None) == 8 + k * (4 + 2)
        if algorithm in ("dense", "allgather", "gtopk", "cltk"):  # every value sent is 2 bytes, not 4
            assert full_bytes - half_bytes > 0 and (full_bytes - half_bytes) % 2 == 0, algorithm
        if algorithm in ("dense", "cltk"):
            assert 2 * (half_bytes - half_frames * HEADER_SIZE) == full_bytes - full_frames * HEADER_SIZE


def bf16_model_rank(rank: int, sync) -> dict:
    outcome = {}
    for name, dtype, residual_dtype in (("bf16", torch.bfloat16, None), ("fp32", torch.float32, None),
                                        ("bf16+fp32 residual", torch.bfloat16, torch.float32)):
        model = net(seed=rank, hidden=64).to(dtype)
        optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sync,
                                        "gtopk", 0.05, residual_dtype=residual_dtype)
        losses, sent = [], 0
        for step in range(12):
            optimizer.zero_grad()
            features, labels = batch(step % 3, rank)
            loss = torch.nn.functional.cross_entropy(model(features.to(dtype)).float(), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            sent += optimizer.last_stats.bytes_sent
        state_bytes = sum(bucket.flat.nbytes + memory.residual.nbytes + memory.momentum.nbytes
                          for bucket, memory in zip(optimizer.buckets, optimizer.memories))
        param_bytes = sum(p.nbytes for p in model.parameters())
        outcome[name] = {"params": flat_params(model).float().tolist(), "losses": losses, "sent": sent,
                         "bucket_dtypes": {str(bucket.flat.dtype) for bucket in optimizer.buckets},
                         "residual_dtypes": {str(memory.residual.dtype) for memory in optimizer.memories},
                         "state_per_param_byte": state_bytes / param_bytes}
    return outcome


def test_a_bf16_model_keeps_bf16_state_sends_half_the_bytes_and_trains(per_rank) -> None:
    per_rank = [models for _, models in per_rank]
    for name in ("bf16", "fp32", "bf16+fp32 residual"):
        assert per_rank[0][name]["params"] == per_rank[1][name]["params"], name
        losses = per_rank[0][name]["losses"]
        assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), (name, losses)
    bf16, fp32, wide = (per_rank[0][name] for name in ("bf16", "fp32", "bf16+fp32 residual"))
    assert bf16["bucket_dtypes"] == {"torch.bfloat16"} and bf16["residual_dtypes"] == {"torch.bfloat16"}
    assert wide["bucket_dtypes"] == {"torch.bfloat16"} and wide["residual_dtypes"] == {"torch.float32"}
    assert bf16["state_per_param_byte"] == pytest.approx(3.0)  # bucket (the .grad itself), residual, momentum
    assert wide["state_per_param_byte"] == pytest.approx(5.0)
    assert bf16["sent"] < 0.8 * fp32["sent"] and wide["sent"] == bf16["sent"]
