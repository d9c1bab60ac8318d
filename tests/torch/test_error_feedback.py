"""Error feedback, DGC momentum correction and masking, warm-up and local clipping."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecoll.collectives.sparse_common import SparseResult
from sparsecoll.torch.error_feedback import ErrorFeedback, clip_local, warmup_density


def top_k_result(vector: torch.Tensor, k: int) -> SparseResult:
    """What a one-rank top-k collective reports: this rank sent its k largest entries."""
    values = vector.numpy()
    indices = np.sort(np.argsort(-np.abs(values), kind="stable")[:k]).astype(np.int64)
    return SparseResult(indices, values[indices].copy(), values.size, indices, values[indices].copy())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 200), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_nothing_is_lost_sent_plus_residual_equals_all_gradients(size: int, steps: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    memory = ErrorFeedback(torch.zeros(size, dtype=torch.float64))
    sent_total = np.zeros(size)
    grads_total = np.zeros(size)
    for _ in range(steps):
        grad = torch.from_numpy(rng.standard_normal(size))
        grads_total += grad.numpy()
        outgoing = memory.accumulate(grad)
        result = top_k_result(outgoing, max(1, size // 10))
        sent_total[result.sent_indices] += result.sent_values
        memory.sent(result)
        assert np.all(memory.residual.numpy()[result.sent_indices] == 0)
    np.testing.assert_allclose(sent_total + memory.residual.numpy(), grads_total, atol=1e-9)


def test_momentum_correction_and_masking_follow_dgc() -> None:
    m = 0.9
    memory = ErrorFeedback(torch.zeros(4, dtype=torch.float64), momentum_masking=True)
    g1 = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    outgoing = memory.accumulate(g1, momentum=m)
    assert torch.equal(memory.momentum, g1) and torch.equal(outgoing, g1)
    memory.sent(top_k_result(outgoing, 1))  # sends index 3
    assert memory.momentum.tolist() == [1.0, 2.0, 3.0, 0.0]
    assert memory.residual.tolist() == [1.0, 2.0, 3.0, 0.0]
    g2 = torch.ones(4, dtype=torch.float64)
    memory.accumulate(g2, momentum=m)
    expected_u = np.array([1.9, 2.8, 3.7, 1.0])
    np.testing.assert_allclose(memory.momentum.numpy(), expected_u)
    np.testing.assert_allclose(memory.residual.numpy(), np.array([1.0, 2.0, 3.0, 0.0]) + expected_u)


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 60), steps=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_unmasked_momentum_correction_sends_dense_momentum_sgds_updates(size: int, steps: int, seed: int) -> None:
    """The default (no masking): what was sent plus the residual is the sum of every step's
    momentum ``u_t`` (what dense momentum SGD applies), whatever top-k picked; DGC's masking
    would drop the momentum of every sent coordinate from then on."""
    rng = np.random.default_rng(seed)
    memory = ErrorFeedback(torch.zeros(size, dtype=torch.float64))
    velocity, applied_dense, sent_total = np.zeros(size), np.zeros(size), np.zeros(size)
    for _ in range(steps):
        grad = rng.standard_normal(size)
        velocity = 0.9 * velocity + grad
        applied_dense += velocity
        result = top_k_result(memory.accumulate(torch.from_numpy(grad), momentum=0.9), max(1, size // 5))
        sent_total[result.sent_indices] += result.sent_values
        memory.sent(result)
    np.testing.assert_allclose(sent_total + memory.residual.numpy(), applied_dense, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(memory.momentum.numpy(), velocity, rtol=1e-12, atol=1e-12)


def test_nesterov_momentum_correction() -> None:
    memory = ErrorFeedback(torch.zeros(2, dtype=torch.float64))
    grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
    memory.accumulate(grad, momentum=0.5, nesterov=True)
    np.testing.assert_allclose(memory.momentum.numpy(), [0.5, -0.5])
    np.testing.assert_allclose(memory.residual.numpy(), [1.5, -1.5])


def test_dense_send_leaves_no_residual_and_keeps_momentum() -> None:
    memory = ErrorFeedback(torch.zeros(3))
    outgoing = memory.accumulate(torch.ones(3), momentum=0.9)
    memory.sent(SparseResult(None, outgoing.numpy().copy(), 3, None, outgoing.numpy().copy()))
    assert not memory.residual.any() and torch.equal(memory.momentum, torch.ones(3))


def test_state_dict_round_trip() -> None:
    memory = ErrorFeedback(torch.zeros(3))
    memory.accumulate(torch.tensor([1.0, 2.0, 3.0]), momentum=0.5)
    copy = ErrorFeedback(torch.zeros(3))
    copy.load_state_dict(memory.state_dict())
    assert torch.equal(copy.residual, memory.residual) and torch.equal(copy.momentum, memory.momentum)
    saved = memory.state_dict()
    memory.residual.add_(1)
    assert not torch.equal(saved["residual"], memory.residual)  # a copy, not a view


def test_warmup_is_exponential_from_dense_to_target() -> None:
    densities = [warmup_density(step, 0.001, 4) for step in range(6)]
    assert densities[0] == 1.0 and densities[4] == densities[5] == 0.001
    ratios = [densities[i + 1] / densities[i] for i in range(4)]
    np.testing.assert_allclose(ratios, [0.001 ** 0.25] * 4)
    assert warmup_density(0, 0.01, 0) == 0.01


def test_local_clipping_scales_to_the_rank_share() -> None:
    buffers = [torch.full((4,), 3.0), torch.full((5,), 4.0)]
    norm_before = math.sqrt(4 * 9 + 5 * 16)
    assert math.isclose(clip_local(buffers, max_norm=2.0, world_size=4), norm_before)
    norm_after = math.sqrt(sum(float((b ** 2).sum()) for b in buffers))
    assert math.isclose(norm_after, 1.0, rel_tol=1e-4)
    small = [torch.full((2,), 0.1)]
    clip_local(small, max_norm=10.0, world_size=4)
    assert torch.allclose(small[0], torch.full((2,), 0.1))
