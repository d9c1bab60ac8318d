"""Registered compressors used by name as collectives (encode, allgather payloads, decode, sum)."""

from __future__ import annotations

import numpy as np
import pytest

from sparsecoll.compress import TopKCodec
from sparsecoll.errors import CollectiveMismatchError, FrameError, GroupAbortedError, SparseCollError
from tests.codecs import SignCodec
from tests.ranks import run_ranks

D = 10_000


def gradient(rank: int) -> np.ndarray:
    return np.random.default_rng(rank).standard_t(2, D).astype(np.float32)


async def _reduce(group, algorithm, options):
    result, stats = await group.reduce_gradient(gradient(group.rank), algorithm, **options)
    return result.dense(), result.residual(gradient(group.rank)), stats.bytes_sent


@pytest.mark.parametrize("world", [1, 3])
def test_registered_sign_codec_sums_decoded_payloads(world):
    results = run_ranks(world, _reduce, "test-sign", {})
    codec = SignCodec()
    decoded = [codec.decode(codec.encode(gradient(rank))) for rank in range(world)]
    expected = np.sum(decoded, axis=0, dtype=np.float32)
    for rank, (total, residual, sent) in enumerate(results):
        np.testing.assert_array_equal(total, results[0][0])  # bit-identical on every rank
        np.testing.assert_allclose(total, expected, rtol=1e-6)
        np.testing.assert_allclose(residual, gradient(rank) - decoded[rank], rtol=1e-6)
        # ring allgather: P-1 blocks of (length table + 1 bit a value + scale) and a header each
        assert sent == (world - 1) * (16 + D // 8 + 4 + 64)


def test_builtin_topk_codec_by_name_equals_sum_of_local_topk():
    results = run_ranks(3, _reduce, "topk", {"density": 0.01})
    expected = np.zeros(D, np.float32)
    for rank in range(3):
        payload = TopKCodec(0.01).encode(gradient(rank))
        expected[payload.indices] += payload.values
    for total, residual, _ in results:
        np.testing.assert_allclose(total, expected, rtol=1e-6)
    assert np.count_nonzero(results[0][1]) == D - 100  # the sent entries left the residual


async def _mismatched(group):
    name = "test-sign" if group.rank == 0 else "topk"
    try:
        await group.reduce_gradient(gradient(group.rank), name, density=0.01)
    except SparseCollError as error:
        return type(error)
    return None


def test_ranks_naming_different_compressors_fail_everywhere():
    outcomes = run_ranks(2, _mismatched)
    assert all(outcome in (CollectiveMismatchError, GroupAbortedError) for outcome in outcomes), outcomes
    assert CollectiveMismatchError in outcomes


async def _corrupt(group):
    try:
        await group.reduce_gradient(gradient(group.rank), "test-bad-indices", density=0.01, rank=group.rank)
    except SparseCollError as error:
        return type(error), str(error)
    return None


def test_out_of_range_indices_from_a_peer_raise_on_every_rank():
    outcomes = run_ranks(3, _corrupt)
    assert all(outcome is not None for outcome in outcomes), outcomes
    assert any(kind is FrameError and "outside [0, 10000)" in text for kind, text in outcomes)
