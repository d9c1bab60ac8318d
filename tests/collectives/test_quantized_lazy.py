"""Quantized values for every algorithm and lazy aggregation for dense and allgather, on real ranks."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from sparsecoll.collectives.lazy import LazyState, skip_map_bytes
from sparsecoll.collectives.reduce import reduce_gradient
from sparsecoll.errors import InvalidArgumentError, SparseCollError
from sparsecoll.wire import HEADER_SIZE
from tests.ranks import run_ranks

D, K, BLOCK = 20_000, 50, 256
SMALL, SEEDS, COPIES = 512, 4, 50
"""The unbiasedness check averages SEEDS calls, each summing COPIES copies of a gradient (every
copy is rounded with its own random draws), so it sees 200 samples in 4 calls."""
ONE_THREAD = {"NUMBA_NUM_THREADS": "1"}
"""Several ranks on 2 cores: Numba's OpenMP threads spinning between kernels starve the other
ranks (a 1 ms quantized allreduce took 60 ms)."""


def gradient(rank: int, size: int = D, seed: int = 0) -> np.ndarray:
    """Heavy-tailed, with heavy coordinates shared by the ranks."""
    rng = np.random.default_rng(1000 * seed + rank)
    grad = rng.standard_t(2, size).astype(np.float32)
    shared = np.random.default_rng(seed).choice(size, 2 * K, replace=False)
    grad[shared] += np.float32(30.0) * np.random.default_rng(seed + 99).standard_normal(2 * K).astype(np.float32)
    return grad


def drifting(rank: int, step: int) -> np.ndarray:
    """A gradient that changes slowly, except for rank 0 every fourth step."""
    drift = 0.5 if (rank == 0 and step % 4 == 0) else 0.001
    return gradient(rank) + np.float32(drift * step)


def local_topk(grad: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.sort(np.argsort(-np.abs(grad), kind="stable")[:k])
    return order, grad[order]


def wire(count: int, bits: int) -> int:
    """Bytes of ``count`` values at ``bits`` bits: a float32 scale per block and packed codes."""
    return 4 * -(-count // BLOCK) + -(-count * bits // 8)


def ring_bytes(count: int, world: int, rank: int, bits: int) -> int:
    """What one rank sends in a quantized ring allreduce of ``count`` values, headers included."""
    base, extra = divmod(count, world)
    chunks = [base + (index < extra) for index in range(world)]
    scatter = sum(HEADER_SIZE + wire(chunks[(rank - step) % world], bits) for step in range(world - 1))
    gather = sum(HEADER_SIZE + wire(chunks[(rank - step + 1) % world], bits) for step in range(world - 1))
    return scatter + gather


# --------------------------------------------------------------------------- on the ranks
async def battery(group) -> dict:
    grad = gradient(group.rank)
    out = {}
    plain, stats = await group.reduce_gradient(grad, "dense")
    out["dense"] = (plain.values, stats.bytes_sent, stats.frames_sent)
    for bits in (8, 4):
        result, stats = await group.reduce_gradient(grad, "dense", quantize_bits=bits, seed=1)
        out[f"dense-q{bits}"] = (result.values.tobytes(), stats.bytes_sent)
    result, stats = await group.reduce_gradient(grad, "cltk", k=K, step=1, quantize_bits=8)
    out["cltk"] = (result.indices, result.values.tobytes(), stats.bytes_sent)
    result, stats = await group.reduce_gradient(grad, "sketch", k=K, quantize_bits=8)
    out["sketch"] = (result.indices, result.values.tobytes(), stats.bytes_sent)
    out["lazy-allgather"] = await lazy_allgather_rounds(group, threshold=0.05)
    out["lazy-exact"] = await lazy_allgather_rounds(group, threshold=0.0)
    state = LazyState(threshold=0.0)
    constant = []
    for _ in range(3):
        result, _ = await group.reduce_gradient(grad, "allgather", k=K, lazy=state)
        constant.append(result.dense().tobytes())
    out["lazy-constant"] = (constant, state.skipped)
    state = LazyState(threshold=0.05, max_stale=3, quantizer="stochastic")
    laq = []
    for step in range(6):
        result, stats = await group.reduce_gradient(drifting(group.rank, step)[:SMALL * 4], "dense",
                                                    quantize_bits=8, lazy=state, step=step)
        laq.append((result.values.tobytes(), stats.bytes_sent, result.sent_indices is not None))
    out["laq"] = (laq, state.skipped_fraction, state.history)
    state = LazyState(threshold=0.05, max_stale=3)
    quantized_lazy = []
    for step in range(4):
        result, _ = await group.reduce_gradient(drifting(group.rank, step), "allgather", k=K, quantize_bits=8,
                                                lazy=state, step=step)
        quantized_lazy.append(result.dense().tobytes())
    out["lazy-allgather-q8"] = (quantized_lazy, state.skipped)
    if group.size == 3:
        out["unbiased"] = await unbiased(group)
    return out


async def lazy_allgather_rounds(group, threshold: float) -> dict:
    state = LazyState(threshold=threshold, max_stale=3)
    rounds = []
    for step in range(6):
        grad = drifting(group.rank, step)
        result, stats = await group.reduce_gradient(grad, "allgather", k=K, lazy=state, step=step)
        plain, _ = await group.reduce_gradient(grad, "allgather", k=K, step=step)
        skipped = result.sent_indices.size == 0
        rounds.append((result.dense().tobytes(), plain.dense().tobytes(), stats.bytes_sent, skipped,
                       result.residual(grad)))
    stale = b"".join(indices.tobytes() + values.tobytes() for indices, values in state.contributions)
    return {"rounds": rounds, "fraction": state.skipped_fraction, "history": state.history, "stale": stale}


async def unbiased(group) -> tuple[np.ndarray, np.ndarray]:
    copies = np.tile(gradient(group.rank, SMALL), COPIES)
    total, squares = np.zeros(SMALL), np.zeros(SMALL)
    for seed in range(SEEDS):
        result, _ = await group.reduce_gradient(copies, "dense", quantize_bits=2, seed=seed)
        samples = result.values.reshape(COPIES, SMALL).astype(np.float64)
        total += samples.sum(axis=0)
        squares += np.square(samples).sum(axis=0)
    return total, squares


async def mismatched(group) -> list[str]:
    import sparsecoll

    grad = gradient(group.rank, 4000)
    odd = group.rank == 1
    scenarios = {
        "dense-bits": lambda g: g.reduce_gradient(grad, "dense", quantize_bits=4 if odd else 8),
        "cltk-bits": lambda g: g.reduce_gradient(grad, "cltk", k=K, quantize_bits=None if odd else 8),
        "sketch-bits": lambda g: g.reduce_gradient(grad, "sketch", k=K, quantize_bits=2 if odd else 8),
        "allgather-lazy": lambda g: g.reduce_gradient(grad, "allgather", k=K,
                                                      lazy=None if odd else LazyState()),
        "laq-bits": lambda g: g.reduce_gradient(grad, "dense", lazy=LazyState(), quantize_bits=4 if odd else 8),
    }
    outcomes = []
    for name, call in scenarios.items():
        async with await sparsecoll.init_group(name=f"quantized-{name}", timeout=10) as sub:
            try:
                await call(sub)
                await sub.barrier()
                outcomes.append("no error")
            except SparseCollError as error:
                outcomes.append(type(error).__name__)
    return outcomes


# --------------------------------------------------------------------------- checks
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_quantized_and_lazy_combinations(world: int) -> None:
    per_rank = run_ranks(world, battery, timeout=120, env=ONE_THREAD)
    grads = [gradient(rank) for rank in range(world)]
    exact = np.sum(grads, axis=0, dtype=np.float32)
    spread = sum(float(np.abs(g).max()) for g in grads)  # bounds every partial sum
    for rank, out in enumerate(per_rank):
        check_dense(out, per_rank[0], exact, spread, world, rank)
        check_cltk_and_sketch(out, per_rank[0], grads, exact, spread, world, rank)
    check_laq(per_rank, world)
    check_lazy_allgather(per_rank, world)
    if world == 3:
        check_unbiased(per_rank, world)


def check_dense(out: dict, first: dict, exact: np.ndarray, spread: float, world: int, rank: int) -> None:
    _, plain_bytes, plain_frames = out["dense"]
    for bits in (8, 4):
        values, sent = out[f"dense-q{bits}"]
        assert values == first[f"dense-q{bits}"][0], "quantized allreduce differs between ranks"
        result = np.frombuffer(values, np.float32)
        steps = (1 << bits) - 2
        # each of the P roundings a value goes through moves it by at most one grid step
        assert np.abs(result - exact).max() <= world * 2 * spread / steps * 1.001
        assert sent == ring_bytes(D, world, rank, bits)
        # b/32 of the float32 ring's payload plus a 4-byte scale per 256 values, same frames
        headers = plain_frames * HEADER_SIZE
        expected = headers + (plain_bytes - headers) * (bits / 32 + 1 / 256)
        assert sent == pytest.approx(expected, rel=0.05)


def check_cltk_and_sketch(out: dict, first: dict, grads: list, exact: np.ndarray, spread: float,
                          world: int, rank: int) -> None:
    indices, values, sent = out["cltk"]
    leader = 1 % world
    np.testing.assert_array_equal(indices, local_topk(grads[leader], K)[0])
    assert values == first["cltk"][1], "quantized CLT-k differs between ranks"
    assert np.abs(np.frombuffer(values, np.float32) - exact[indices]).max() <= world * 2 * spread / 254 * 1.001
    chain = (HEADER_SIZE + 4 * K) if (rank - leader) % world != world - 1 else 0
    assert sent == chain + ring_bytes(K, world, rank, 8)
    indices, values, sent = out["sketch"]
    np.testing.assert_array_equal(indices, first["sketch"][0])
    assert values == first["sketch"][1], "quantized sketch differs between ranks"
    true_top = set(local_topk(exact, K)[0])
    assert len(true_top & set(indices)) >= 0.9 * K
    assert sent == ring_bytes(5 * 20 * K, world, rank, 8) + ring_bytes(4 * K, world, rank, 8)


def check_lazy_allgather(per_rank: list[dict], world: int) -> None:
    first = per_rank[0]["lazy-allgather"]
    skips = [[round_[3] for round_ in out["lazy-allgather"]["rounds"]] for out in per_rank]
    assert min(out["lazy-allgather"]["fraction"] for out in per_rank) > 0
    last_sent: list = [None] * world
    for step in range(len(first["rounds"])):
        reference = np.zeros(D, np.float32)
        for rank in range(world):
            if not skips[rank][step]:
                last_sent[rank] = local_topk(drifting(rank, step), K)
            reference[last_sent[rank][0]] += last_sent[rank][1]
        np.testing.assert_array_equal(np.frombuffer(first["rounds"][step][0], np.float32), reference)
    for rank, out in enumerate(per_rank):
        lazy = out["lazy-allgather"]
        assert lazy["history"] == first["history"]
        assert lazy["stale"] == first["stale"], "stale copies differ between ranks"
        for step, (result, _plain, sent, skip, residual) in enumerate(lazy["rounds"]):
            assert result == first["rounds"][step][0], "lazy allgather differs between ranks"
            if skip:  # nothing new went out: the whole gradient stays behind for error feedback
                np.testing.assert_array_equal(residual, drifting(rank, step))
            # a skipping rank's block is an empty frame, the others' (count, k indices, k values)
            forwarded = [(rank - hop) % world for hop in range(world - 1)]
            assert sent == sum(HEADER_SIZE + (0 if skips[r][step] else 8 + 8 * K) for r in forwarded)
        for step, (result, plain, *_rest) in enumerate(out["lazy-exact"]["rounds"]):
            assert result == plain, f"threshold 0 changed the sum at step {step}"
        constant, skipped = out["lazy-constant"]
        assert skipped == 2 and constant[0] == constant[1] == constant[2]
        assert out["lazy-allgather-q8"][0] == per_rank[0]["lazy-allgather-q8"][0]


def check_laq(per_rank: list[dict], world: int) -> None:
    count = SMALL * 4
    skips = [[skipped for *_, skipped in out["laq"][0]] for out in per_rank]
    for rank, out in enumerate(per_rank):
        rounds, fraction, history = out["laq"]
        assert history == per_rank[0]["laq"][2]
        assert fraction > 0 or rank == 0
        forwarded = [(rank - hop) % world for hop in range(world - 1)]
        for step, (values, sent, _) in enumerate(rounds):
            assert values == per_rank[0]["laq"][0][step][0], "LAQ differs between ranks"
            # the upload map, then the uploaders' changes at 8 bits along the ring (skippers send nothing)
            uploads = [not skips[r][step] for r in range(world)]
            changes = sum(HEADER_SIZE + wire(count, 8) for r in forwarded if uploads[r]) if any(uploads) else 0
            assert sent == skip_map_bytes(rank, world) + changes
    exact = sum(drifting(rank, 0)[:count] for rank in range(world))
    first_round = np.frombuffer(per_rank[0]["laq"][0][0][0], np.float32)
    scale = max(float(np.abs(drifting(rank, 0)[:count]).max()) for rank in range(world))
    assert np.abs(first_round - exact).max() <= world * 2 * scale / 254 * 1.001


def check_unbiased(per_rank: list[dict], world: int) -> None:
    """The mean of many quantized sums is the exact sum, up to the measured noise."""
    for out in per_rank[1:]:
        for mine, theirs in zip(out["unbiased"], per_rank[0]["unbiased"]):
            assert mine.tobytes() == theirs.tobytes()
    total, squares = per_rank[0]["unbiased"]
    exact = np.sum([gradient(rank, SMALL) for rank in range(world)], axis=0, dtype=np.float64)
    samples = SEEDS * COPIES
    mean = total / samples
    variance = (squares / samples - mean ** 2) * samples / (samples - 1)
    noise = np.sum(variance) / samples  # what sum((mean - exact)^2) is expected to be if unbiased
    error = mean - exact
    # 2 bits (grid {-s, 0, s}): large noise, and rounding to nearest would be off by up to s/2
    assert noise > 1.0
    # a bias adds sum(bias^2) on top of the noise; unbiased, the ratio is 1 +- 0.1
    assert np.sum(error ** 2) <= 1.5 * noise
    # shrinking towards zero (a common rounding bias) would make this sum strongly negative
    assert abs(np.sum(np.sign(exact) * error)) <= 5 * np.sqrt(noise)


def test_disagreeing_ranks_fail_with_a_mismatch_everywhere() -> None:
    for outcome in run_ranks(3, mismatched, timeout=120, env=ONE_THREAD):
        assert outcome == ["CollectiveMismatchError"] * 5, outcome


@pytest.mark.parametrize("algorithm", ["gtopk", "sketch", "cltk"])
def test_lazy_is_refused_where_it_cannot_compose(algorithm: str) -> None:
    with pytest.raises(InvalidArgumentError, match="every round"):
        asyncio.run(reduce_gradient(None, gradient(0, 100), algorithm, k=5, lazy=LazyState()))


def test_unsupported_bit_widths_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="bits"):
        asyncio.run(reduce_gradient(None, gradient(0, 100), "dense", quantize_bits=3))


def test_lazy_state_round_trips_its_stale_copies() -> None:
    state = LazyState(threshold=0.2)
    state.contributions = [(np.arange(3), np.ones(3, np.float32))]
    saved = state.state_dict()
    state.contributions[0][1][:] = 7
    restored = LazyState()
    restored.load_state_dict(saved)
    np.testing.assert_array_equal(restored.contributions[0][1], np.ones(3, np.float32))
    assert restored.threshold == 0.2
