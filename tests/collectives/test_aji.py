"""Aji & Heafield's sampled threshold on the builtin sparse allgather: uint32 indices, exact bytes."""

from __future__ import annotations

import numpy as np

from sparsecoll import kernels
from sparsecoll.wire import HEADER_SIZE
from tests.ranks import run_ranks

SIZE, DENSITY, SEED = 50_000, 0.01, 3


def gradient(rank: int) -> np.ndarray:
    return np.random.default_rng(rank).standard_t(3, SIZE).astype(np.float32)


async def sampled(group) -> dict:
    grad = gradient(group.rank)
    builtin, builtin_stats = await group.reduce_gradient(grad, "allgather", density=DENSITY, selection="threshold",
                                                         seed=SEED)
    generic, generic_stats = await group.reduce_gradient(grad, "threshold", density=DENSITY, seed=SEED)
    return {"dense": builtin.dense(), "sent": builtin.sent_indices, "bytes": builtin_stats.bytes_sent,
            "generic_bytes": generic_stats.bytes_sent}


def test_sampled_threshold_travels_on_the_builtin_path_with_uint32_indices() -> None:
    world = 3
    per_rank = run_ranks(world, sampled, timeout=90, env={"NUMBA_NUM_THREADS": "1"})
    counts = [rank["sent"].size for rank in per_rank]
    expected_sum = np.zeros(SIZE, np.float64)
    for rank, result in enumerate(per_rank):
        grad = gradient(rank)
        cut = kernels.estimate_threshold(grad, round(SIZE * DENSITY), seed=SEED + 104729 * rank)
        kept = np.flatnonzero(np.abs(grad) > cut)
        np.testing.assert_array_equal(result["sent"], kept)  # everything above the sampled cut, nothing else
        assert 0.5 * DENSITY * SIZE <= kept.size <= 2 * DENSITY * SIZE
        expected_sum[kept] += grad[kept]
    print(f"bytes a rank sends: builtin {[r['bytes'] for r in per_rank]}, "
          f"generic {[r['generic_bytes'] for r in per_rank]}")
    for rank, result in enumerate(per_rank):
        np.testing.assert_allclose(result["dense"], expected_sum, rtol=1e-6, atol=1e-6)
        # the ring forwards P-1 blocks: a uint64 count, then uint32 indices and float32 values
        forwarded = [(rank - hop) % world for hop in range(world - 1)]
        assert result["bytes"] == sum(HEADER_SIZE + 8 + counts[r] * (4 + 4) for r in forwarded)
        # the generic codec path ships int64 indices: well above the builtin's bytes
        assert result["generic_bytes"] > 1.4 * result["bytes"], (result["generic_bytes"], result["bytes"])
