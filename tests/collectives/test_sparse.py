"""Sparse and compressed collectives on real ranks against numpy references."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from sparsecoll.collectives.lazy import LazyState
from sparsecoll.compress import ParameterQuantizer
from sparsecoll.wire import HEADER_SIZE
from tests.ranks import run_ranks

D, K = 20_000, 50


def gradient(rank: int, size: int = D, seed: int = 0) -> np.ndarray:
    """Heavy-tailed (Student t, 2 degrees of freedom) with shared heavy coordinates."""
    rng = np.random.default_rng(1000 * seed + rank)
    shared = np.random.default_rng(seed).choice(size, 2 * K, replace=False)
    grad = rng.standard_t(2, size).astype(np.float32)
    grad[shared] += np.float32(30.0) * np.random.default_rng(seed + 99).standard_normal(2 * K).astype(np.float32)
    return grad


def local_topk(grad: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by magnitude, ties to the lower index; indices ascending."""
    order = np.argsort(-np.abs(grad), kind="stable")[:k]
    chosen = np.sort(order)
    return chosen, grad[chosen]


def merge_top(a, b, k):
    union = np.union1d(a[0], b[0])
    values = np.zeros(union.size, np.float32)
    values[np.searchsorted(union, a[0])] += a[1]
    values[np.searchsorted(union, b[0])] += b[1]
    return local_topk_sparse(union, values, k)


def local_topk_sparse(indices, values, k):
    order = np.sort(np.argsort(-np.abs(values), kind="stable")[:k])
    return indices[order], values[order]


def reference_gtopk(locals_: list, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's recursive doubling with the fold for P not a power of two, in numpy."""
    world = len(locals_)
    power = 1 << (world.bit_length() - 1)
    extra = world - power
    state = {}
    for rank in range(world):
        if rank < 2 * extra and rank % 2 == 1:
            state[rank // 2] = merge_top(locals_[rank], locals_[rank - 1], k)
        elif rank >= 2 * extra:
            state[rank - extra] = locals_[rank]
    distance = 1
    while distance < power:
        state = {v: merge_top(state[v], state[v ^ distance], k) for v in state}
        distance <<= 1
    return state[0]


def summed_selections(world: int, k: int) -> np.ndarray:
    dense = np.zeros(D, np.float32)
    for rank in range(world):
        indices, values = local_topk(gradient(rank), k)
        dense[indices] += values
    return dense


async def sparse_battery(group) -> dict:
    grad = gradient(group.rank)
    out = {}
    result, stats = await group.sparse_allgather(grad, k=K)
    out["allgather"] = (result.dense(), stats.bytes_sent, result.sent_indices)
    result, stats = await group.gtopk(grad, k=K)
    out["gtopk"] = (result.indices, result.values.tobytes(), stats.bytes_sent, result.sent_indices,
                    result.sent_values)
    result, stats = await group.gtopk(grad, k=K, exact=True)
    out["gtopk-exact"] = result.indices
    result, stats = await group.cltk(grad, k=K, step=3)
    out["cltk"] = (result.indices, result.values, stats.bytes_sent)
    result, stats = await group.sketch_allreduce(grad, k=K)
    out["sketch"] = (result.indices, result.values, stats.bytes_sent)
    result, stats = await group.sketch_allreduce(np.concatenate([grad, grad]), k=K)
    out["sketch-2d"] = stats.bytes_sent
    result, stats = await group.sparse_allgather(grad, k=K, quantize_bits=8)
    out["allgather-q8"] = (result.dense(), stats.bytes_sent)
    result, stats = await group.sparse_allgather(grad, selection="threshold", threshold=8.0)
    out["threshold"] = result.dense()
    result, stats = await group.reduce_gradient(grad, "gtopk", density=K / D)
    out["entry"] = result.indices
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8])
def test_sparse_collectives_match_numpy(world: int) -> None:
    check_battery(world)


def test_sparse_collectives_match_numpy_on_each_backend(backend: str) -> None:
    if backend == "tcp":
        pytest.skip("the TCP transport runs every world size above")
    check_battery(3)  # 3 ranks: gTop-k's fold, CLT-k's chain and the rings, over UCX


def check_battery(world: int) -> None:
    """Every sparse collective on ``world`` real ranks against its numpy reference."""
    per_rank = run_ranks(world, sparse_battery, timeout=240)
    locals_ = [local_topk(gradient(r), K) for r in range(world)]
    summed = summed_selections(world, K)
    truth = np.zeros(D, np.float32)
    for rank in range(world):
        truth += gradient(rank)
    true_top = set(local_topk(truth, K)[0])
    expected_gtopk = reference_gtopk(locals_, K)
    leader = 3 % world
    leader_indices = locals_[leader][0]
    for rank, out in enumerate(per_rank):
        dense, sent, own = out["allgather"]
        np.testing.assert_array_equal(dense, summed)
        np.testing.assert_array_equal(own, locals_[rank][0])
        assert sent == (world - 1) * (HEADER_SIZE + 8 + K * 8)
        indices, values, sent, taken, _ = out["gtopk"]
        np.testing.assert_array_equal(indices, expected_gtopk[0])
        assert values == per_rank[0]["gtopk"][1], "gTop-k values differ between ranks"
        np.testing.assert_array_equal(np.frombuffer(values, np.float32), expected_gtopk[1])
        assert set(taken) <= set(locals_[rank][0]) & set(indices)
        rounds = (world.bit_length() - 1)
        assert sent <= (rounds + 1) * (HEADER_SIZE + 8 + K * 8) + HEADER_SIZE + (K + 7) // 8  # + a host's mask
        np.testing.assert_array_equal(out["gtopk-exact"], expected_gtopk[0])
        np.testing.assert_array_equal(out["entry"], expected_gtopk[0])
        if rank == world - 1:  # error feedback: what the ranks call sent is exactly what was summed
            contributed = np.zeros(D, np.float64)
            for other in per_rank:
                np.add.at(contributed, other["gtopk"][3], other["gtopk"][4])
            np.testing.assert_allclose(contributed[indices], np.frombuffer(values, np.float32), rtol=1e-5)
            assert np.count_nonzero(contributed) == np.count_nonzero(contributed[indices])
        if world == 2:  # one merge: exactly the top-k of the summed selections
            np.testing.assert_array_equal(indices, local_topk(summed, K)[0])
        indices, values, _ = out["cltk"]
        np.testing.assert_array_equal(indices, leader_indices)
        np.testing.assert_allclose(values, truth[leader_indices], rtol=1e-5, atol=1e-4)
        indices, values, sketch_bytes = out["sketch"]
        recall = len(true_top & set(indices)) / K
        assert recall >= 0.9, f"sketch recovered {recall:.0%} of the true top-k"
        np.testing.assert_allclose(values, truth[indices], rtol=1e-5, atol=1e-4)
        assert out["sketch-2d"] == sketch_bytes, "sketch traffic grew with d"
        quantized, quantized_bytes = out["allgather-q8"]
        scale = max(np.abs(v).max() for _, v in locals_) / 127
        assert np.abs(quantized - summed).max() <= world * scale * 1.01
        # 8-bit values: k bytes of codes and one float32 scale per 256 values, instead of 4k bytes
        assert quantized_bytes == (world - 1) * (HEADER_SIZE + 8 + K * 4 + 4 * (-(-K // 256)) + K)
        threshold_truth = np.zeros(D, np.float32)
        for r in range(world):
            g = gradient(r)
            threshold_truth[np.abs(g) > 8.0] += g[np.abs(g) > 8.0]
        np.testing.assert_array_equal(out["threshold"], threshold_truth)


async def traffic(group) -> dict:
    grad = gradient(group.rank)
    measured = {}
    for name in ("allgather", "gtopk", "cltk"):
        _, stats = await group.collective(name, grad, k=K)
        measured[name] = (stats.bytes_sent, stats.frames_sent)
    return measured


def test_traffic_grows_as_the_formulas_say() -> None:
    pair = HEADER_SIZE + 8 + K * 8
    for world in (2, 4, 8):
        per_rank = run_ranks(world, traffic, timeout=120)
        mean = {name: np.mean([r[name][0] for r in per_rank]) for name in per_rank[0]}
        payload = {name: np.mean([r[name][0] - HEADER_SIZE * r[name][1] for r in per_rank])
                   for name in per_rank[0]}
        assert mean["allgather"] == (world - 1) * pair  # grows with P
        assert abs(mean["gtopk"] - np.log2(world) * pair) <= 0.05 * np.log2(world) * pair  # log2 P
        # CLT-k: k indices down a chain and a ring allreduce of k floats: 3·4k·(P-1)/P < 12k
        assert payload["cltk"] == pytest.approx(3 * 4 * K * (world - 1) / world)


async def lazy_rounds(group) -> tuple:
    state = LazyState(threshold=0.05, max_stale=3)
    base = gradient(group.rank, 1000)
    results = []
    for step in range(8):
        drift = 0.5 if (group.rank == 0 and step % 4 == 0) else 0.001
        grad = base + drift * step
        result, _ = await group.reduce_gradient(grad, "dense", lazy=state)
        results.append(result.values.copy())
    return state.skipped_fraction, state.group_skips, results, state.history


def test_lazy_aggregation_skips_and_stays_consistent() -> None:
    per_rank = run_ranks(3, lazy_rounds, timeout=60)
    fractions = [fraction for fraction, *_ in per_rank]
    assert max(fractions) > 0.3, fractions
    for _, skips, results, history in per_rank:
        assert skips == per_rank[0][1] and history == per_rank[0][3]
        for mine, theirs in zip(results, per_rank[0][2]):
            assert mine.tobytes() == theirs.tobytes()
    # step 0 sends everything: the sum is exact
    exact = sum(gradient(r, 1000) for r in range(3))
    np.testing.assert_allclose(per_rank[0][2][0], exact, rtol=1e-6)


async def quantized_parameters(group) -> tuple:
    from sparsecoll.collectives.quantized import broadcast_parameters

    initial = np.zeros(3000)
    quantizer = ParameterQuantizer(initial, bits=8, seed=5)
    for step in range(5):
        truth = np.sin(np.arange(3000) * 0.01 * (step + 1))
        params, stats = await broadcast_parameters(group, truth if group.rank == 1 else None, quantizer, root=1)
    return params, stats.bytes_received


def test_parameters_broadcast_quantized_agree_everywhere() -> None:
    per_rank = run_ranks(3, quantized_parameters, timeout=60)
    truth = np.sin(np.arange(3000) * 0.05)
    for rank, (params, received) in enumerate(per_rank):
        assert params.tobytes() == per_rank[0][0].tobytes()
        # one step's change (at most 2) at 8 bits: error below one grid step, 2/127
        assert np.abs(params - truth).max() < 2.1 / 127
        if rank != 1:  # codes (1 byte) and a float32 scale per 256 values, not 8-byte floats
            assert received == HEADER_SIZE + 3000 + 4 * 12


async def dies_in_round_two(group) -> str:
    """Rank 3 dies after its first merge, before it sends in the second round."""
    if group.rank == 3:
        from sparsecoll.collectives import gtopk as module

        def merge_then_die(*args):
            os.kill(os.getpid(), signal.SIGKILL)

        module.merge_top = merge_then_die
    try:
        await group.gtopk(gradient(group.rank), k=K, timeout=10)
        # ranks whose last partner was not rank 3 finish the call with a correct result;
        # the loss reaches them on their next call
        await group.barrier(timeout=10)
    except Exception as error:
        return f"{type(error).__name__}:{getattr(error, 'peer', None)}"
    return "no error"


def test_peer_dying_in_round_two_of_gtopk() -> None:
    results = run_ranks(4, dies_in_round_two, timeout=60, expect_dead={3})
    assert results[:3] == ["PeerLostError:3"] * 3, results


async def mismatched(group) -> list[str]:
    import sparsecoll

    outcomes = []
    grad = gradient(group.rank)
    for scenario in ("k", "algorithm"):
        async with await sparsecoll.init_group(name=f"sparse-{scenario}", timeout=10) as sub:
            try:
                if scenario == "k":
                    await sub.gtopk(grad, k=K + (sub.rank == 1))
                else:
                    await (sub.gtopk(grad, k=K) if sub.rank == 0 else sub.sparse_allgather(grad, k=K))
                await sub.barrier()
                outcomes.append("no error")
            except Exception as error:
                outcomes.append(type(error).__name__)
    return outcomes


def test_mismatched_k_or_algorithm_fails_on_every_rank() -> None:
    for outcome in run_ranks(3, mismatched, timeout=90):
        assert outcome == ["CollectiveMismatchError"] * 2


NAN_DEADLINE = 60.0


async def nan_on_one_rank(group) -> list[str]:
    import time

    outcomes = []
    for name in ("gtopk", "allgather", "cltk", "sketch"):
        async with await sparsecoll_init(name) as sub:
            grad = gradient(sub.rank)
            if sub.rank == 1:
                grad[7] = np.nan
            started = time.monotonic()
            try:
                await sub.reduce_gradient(grad, name, k=K, step=1, timeout=NAN_DEADLINE)
                outcomes.append("no error")
            except Exception as error:
                # promptly: long before the deadline, which a rank left waiting would run out
                outcomes.append(f"{type(error).__name__}:{time.monotonic() - started < NAN_DEADLINE / 4}")
    return outcomes


def sparsecoll_init(name: str):
    import sparsecoll

    return sparsecoll.init_group(name=f"nan-{name}", timeout=NAN_DEADLINE)


def test_a_nan_gradient_on_one_rank_fails_every_rank_promptly() -> None:
    for outcome in run_ranks(3, nan_on_one_rank, timeout=120):
        assert outcome == ["InvalidArgumentError:True"] * 4, outcome


async def quantized_gtopk(group) -> tuple:
    grad = np.random.default_rng(group.rank).standard_t(2, 200_000).astype(np.float32)
    result, _ = await group.gtopk(grad, k=400, quantize_bits=4, step=1)
    return result.indices.tobytes(), result.values.tobytes(), set(result.sent_indices.tolist())


@pytest.mark.parametrize("world", [3, 4])
def test_quantized_gtopk_agrees_on_every_rank(world: int) -> None:
    # ranks that hold the same merge must round it alike, or the next round's pairs diverge
    per_rank = run_ranks(world, quantized_gtopk, timeout=60)
    assert all(out[:2] == per_rank[0][:2] for out in per_rank)
    indices = set(np.frombuffer(per_rank[0][0], np.int64).tolist())
    assert set().union(*(out[2] for out in per_rank)) == indices  # every entry was sent by someone
