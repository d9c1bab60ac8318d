"""Dense collectives on real ranks against a numpy reference, for world sizes 1 to 8."""

from __future__ import annotations

import numpy as np
import pytest

from sparsecoll.collectives import dense
from sparsecoll.wire import HEADER_SIZE
from tests.ranks import run_ranks

DTYPES = ["float32", "float16", "float64", "int32", "int64"]
# 0 and 1 items, fewer items than ranks, odd, non-multiple of P, above the ring threshold
SIZES = [0, 1, 5, 33, 1001, 20_011]
OPS = ["sum", "mean", "max", "min", "prod"]


def rank_input(rank: int, size: int, dtype: str, salt: int = 0) -> np.ndarray:
    """Small integers, so sums and products of up to 8 ranks are exact in every dtype."""
    rng = np.random.default_rng(1000 * rank + 17 * size + salt)
    values = rng.integers(-3, 4, size) if dtype != "prod" else rng.choice([-1, 1, 2], size)
    return values.astype(dtype)


def prod_input(rank: int, size: int, dtype: str) -> np.ndarray:
    rng = np.random.default_rng(7 * rank + size)
    return rng.choice([-1, 1, 2], size).astype(dtype)


async def battery(group) -> dict:
    """Every dense collective over every dtype and size; the parent checks the values."""
    results: dict = {}
    rank = group.rank
    for dtype in DTYPES:
        for size in SIZES:
            data = rank_input(rank, size, dtype)
            for op in OPS:
                if op == "mean" and not dtype.startswith("float"):
                    continue
                source = prod_input(rank, size, dtype) if op == "prod" else data
                value, stats = await group.allreduce(source, op)
                results[("allreduce", dtype, size, op)] = value
            inplace = data.copy()
            value, _ = await group.allreduce(inplace, out=inplace)
            results[("allreduce-inplace", dtype, size)] = (value is inplace, inplace.copy())
            value, _ = await group.allgather(data.reshape(1, -1))
            results[("allgather", dtype, size)] = value
            own = rank_input(rank, (size + 3 * rank) % 50, dtype)
            value, _ = await group.allgatherv(own)
            results[("allgatherv", dtype, size)] = [block.copy() for block in value]
            counts = [(size + 3 * peer) % 50 for peer in range(group.size)]
            value, _ = await group.allgatherv(own, counts=counts)
            results[("allgatherv-counts", dtype, size)] = [block.copy() for block in value]
            for root in {0, group.size - 1, group.size // 2}:
                buffer = data.copy() if rank == root else np.zeros_like(data)
                value, _ = await group.broadcast(buffer, root, out=buffer)
                results[("broadcast", dtype, size, root)] = buffer.copy()
    # large arrays through the segmented paths (small segments make several per chunk)
    dense.SEGMENT_BYTES = 4096
    big = rank_input(rank, 100_003, "float32")
    results[("ring-segmented",)] = (await group.allreduce(big))[0]
    results[("chain-segmented",)] = (await group.broadcast(big, root=group.size - 1))[0]
    results[("allgather-segmented",)] = (await group.allgather(big[:9000]))[0]
    await group.barrier()
    return results


def reference(case: tuple, world: int):
    kind, *rest = case
    if kind in ("ring-segmented", "chain-segmented", "allgather-segmented"):
        inputs = [rank_input(r, 100_003, "float32") for r in range(world)]
        if kind == "ring-segmented":
            return np.sum(inputs, axis=0, dtype=np.float32)
        if kind == "chain-segmented":
            return inputs[world - 1]
        return np.stack([x[:9000] for x in inputs])
    dtype, size = rest[0], rest[1]
    if kind == "allreduce":
        op = rest[2]
        if op == "prod":
            stack = np.stack([prod_input(r, size, dtype) for r in range(world)])
            return np.prod(stack, axis=0, dtype=dtype)
        stack = np.stack([rank_input(r, size, dtype) for r in range(world)])
        if op == "mean":
            return (np.sum(stack, axis=0, dtype=dtype) / np.asarray(world, dtype)).astype(dtype)
        return {"sum": np.sum, "max": np.max, "min": np.min}[op](stack, axis=0).astype(dtype)
    if kind == "allreduce-inplace":
        return np.sum([rank_input(r, size, dtype) for r in range(world)], axis=0, dtype=dtype)
    if kind == "allgather":
        return np.stack([rank_input(r, size, dtype).reshape(1, -1) for r in range(world)])
    if kind in ("allgatherv", "allgatherv-counts"):
        return [rank_input(r, (size + 3 * r) % 50, dtype) for r in range(world)]
    if kind == "broadcast":
        return rank_input(rest[2], size, dtype)
    raise AssertionError(case)


@pytest.mark.parametrize("world", range(1, 9))
def test_dense_collectives_match_numpy(world: int, backend: str) -> None:
    per_rank = run_ranks(world, battery, timeout=240)
    for rank, results in enumerate(per_rank):
        assert isinstance(results, dict), f"rank {rank} failed: {results!r}"
        for case, value in results.items():
            expected = reference(case, world)
            if case[0] == "allreduce-inplace":
                was_inplace, value = value
                assert was_inplace, case
            if isinstance(expected, list):
                assert len(value) == world
                for got, want in zip(value, expected):
                    np.testing.assert_array_equal(got, want, err_msg=str(case))
                    assert got.dtype == want.dtype
            else:
                assert value.dtype == expected.dtype, case
                assert value.shape == expected.shape, case
                np.testing.assert_array_equal(value, expected, err_msg=f"rank {rank} {case}")
    for case in per_rank[0]:
        if case[0].startswith("allreduce"):
            first = per_rank[0][case] if case[0] == "allreduce" else per_rank[0][case][1]
            for other in per_rank[1:]:
                got = other[case] if case[0] == "allreduce" else other[case][1]
                assert first.tobytes() == got.tobytes(), f"ranks disagree bitwise on {case}"


async def float_sums(group) -> list[bytes]:
    """Random floats (inexact sums): results must still be bit-identical on every rank."""
    rng = np.random.default_rng(group.rank)
    out = []
    for size in (3, 10_000, 300_000):
        value, _ = await group.allreduce(rng.standard_normal(size).astype(np.float32))
        out.append(value.tobytes())
    return out


@pytest.mark.parametrize("world", [3, 4])
def test_allreduce_bit_identical_on_every_rank(world: int, backend: str) -> None:
    per_rank = run_ranks(world, float_sums, timeout=60)
    assert all(result == per_rank[0] for result in per_rank[1:])


async def measured_bytes(group) -> dict:
    stats = {}
    for count in (1000, 50_000, 50_001):
        _, stat = await group.allreduce(np.ones(count, np.float32))
        stats[("allreduce", count)] = (stat.bytes_sent, stat.bytes_received, stat.frames_sent)
        _, stat = await group.allgather(np.ones(count, np.float32))
        stats[("allgather", count)] = (stat.bytes_sent, stat.bytes_received, stat.frames_sent)
    _, stat = await group.barrier()
    stats[("barrier",)] = (stat.bytes_sent, stat.bytes_received, stat.frames_sent)
    return stats


@pytest.mark.parametrize("world", [2, 4, 5])
def test_bytes_on_the_wire_match_the_formulas(world: int, backend: str) -> None:
    per_rank = run_ranks(world, measured_bytes, timeout=60)
    for rank, stats in enumerate(per_rank):
        for count in (1000, 50_000, 50_001):
            nbytes = 4 * count
            sent, received, frames = stats[("allreduce", count)]
            if nbytes <= dense.SMALL_ALLREDUCE_BYTES:
                power = 1 << (world.bit_length() - 1)
                extra = world - power
                rounds = power.bit_length() - 1
                if rank < 2 * extra:
                    expected_frames = 1 if rank % 2 == 0 else rounds + 1
                else:
                    expected_frames = rounds
                assert frames == expected_frames
                assert sent == expected_frames * (nbytes + HEADER_SIZE)
            else:
                # ring: every chunk but (r+1) in reduce-scatter, every chunk but (r+2) in allgather
                chunks = np.diff(dense.chunk_bounds(count, world))
                items = 2 * count - chunks[(rank + 1) % world] - chunks[(rank + 2) % world]
                assert frames == 2 * (world - 1)
                assert sent == 4 * items + frames * HEADER_SIZE
                assert abs(sent - 2 * (world - 1) / world * nbytes) <= frames * HEADER_SIZE + 8
            sent, received, frames = stats[("allgather", count)]
            assert sent == received == (world - 1) * (nbytes + HEADER_SIZE)
        sent, received, frames = stats[("barrier",)]
        rounds = (world - 1).bit_length()
        assert (sent, received, frames) == (rounds * HEADER_SIZE, rounds * HEADER_SIZE, rounds)
