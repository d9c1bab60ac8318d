"""The asynchronous parameter server with double quantization (sparsecoll.ps, AsyLPG) on real ranks."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from sparsecoll.compress import QuantizeCodec
from sparsecoll.errors import (
    FrameError,
    GroupAbortedError,
    InvalidArgumentError,
    PeerLostError,
    SparseCollError,
)
from sparsecoll.kernels.quantize import grid_steps
from sparsecoll.ps import AsyLPGConfig, Worker, serve
from sparsecoll.ps.config import MESSAGE_HEADER_BYTES
from sparsecoll.ps.messages import Kind, decode_values, encode_values, frame, parse, split_indices
from tests.ranks import run_ranks

DIM, ROWS = 100, 400


def least_squares_shard(rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Worker ``rank``'s rows of one noisy linear model."""
    truth = np.random.default_rng(0).normal(size=DIM)
    rng = np.random.default_rng(rank)
    features = rng.normal(size=(ROWS, DIM))
    return features, features @ truth + 0.1 * rng.normal(size=ROWS)


STALE_TAG, PULLED_TAG = 77, 78


async def train_least_squares(group, sessions: list[dict], steps: int):
    """One parameter-server session per config, a barrier between them; full-batch gradients.

    A session's ``stale_rank`` (not a config field) pulls, then waits until every other worker
    has finished before its first push, so that push is exactly as stale as the others' pushes
    together; the others start pushing only once its pull is served (else a push can land
    first and the stale push is one update younger). ``steps`` overrides the pushes per worker.
    """
    results = []
    for options in sessions:
        options = dict(options)
        stale_rank = options.pop("stale_rank", -1)
        pushes = options.pop("steps", steps)
        config = AsyLPGConfig(**options)
        if group.rank == 0:
            results.append(await serve(group, np.zeros(DIM), config, timeout=60))
        else:
            features, targets = least_squares_shard(group.rank)
            worker = Worker(group, DIM, config, timeout=60)
            params = await worker.pull()
            others = set(range(1, group.size)) - {stale_rank}
            if group.rank == stale_rank:
                for other in others:  # its pull is served: now the others may push
                    await group.send(np.zeros(1), other, PULLED_TAG)
                for other in others:
                    await group.recv(other, STALE_TAG, timeout=60)
            elif stale_rank > 0:
                await group.recv(stale_rank, PULLED_TAG, timeout=60)
            for _ in range(pushes):
                params = await worker.push(features.T @ (features @ params - targets) / ROWS)
            if 0 < stale_rank != group.rank:
                await group.send(np.zeros(1), stale_rank, STALE_TAG)
            await worker.close()
            results.append(worker.stats)
        await group.barrier()
    return results


PRECISIONS = [
    dict(lr=0.3, param_bits=32, grad_bits=32),
    dict(lr=0.3, param_bits=8, grad_bits=8),
    dict(lr=0.3, param_bits=4, grad_bits=4),
    dict(lr=0.3, param_bits=8, grad_bits=4, density=0.25),
]
STEPS, RANKS = 50, 4
STALE_STEPS = 10
STALE_BY = STALE_STEPS * (RANKS - 2)
"""How old the stale rank's first push is: every update the other workers made."""
STALENESS = [dict(lr=0.3, staleness=STALE_BY - 1, stale_rank=3, steps=STALE_STEPS),
             dict(lr=0.3, staleness=STALE_BY, stale_rank=3, steps=STALE_STEPS)]


@pytest.fixture(scope="module")
def job() -> list[dict]:
    """One job of 4 real ranks runs every multi-session test below, one part after another.

    Spawning ranks costs far more than the sessions on a loaded machine, so the least-squares,
    one-worker and digits sessions share it; each test reads its part.
    """
    return run_ranks(RANKS, every_session, timeout=300, group_kwargs=None)


def every_session(rank: int, world_size: int) -> dict:
    """Rank ``rank``'s results of each part, separated by barriers."""
    import sparsecoll

    results = {}
    try:
        with sparsecoll.init_sync_group() as group:
            results["least_squares"] = group.run(train_least_squares(group.group, PRECISIONS + STALENESS, STEPS))
            group.barrier()
            pair = group.group.new_group([0, 1])  # the one-worker sessions: rank 1 alone serves as worker
            if pair is not None:
                results["one_worker"] = group.run(one_worker(pair))
            group.barrier()
            results["digits"] = train_digits(group, epochs=10)
            group.run(disagree_on_bits(group.group))  # last: it fails the group
    except SparseCollError as error:
        results["disagreement"] = type(error).__name__
    return results


async def disagree_on_bits(group) -> None:
    """Rank 2 pushes 4-bit gradients to a server that expects 8; everyone then meets at a barrier.

    The server swallows its error and goes to the barrier: only the group's poisoning by
    ``serve`` can then stop the workers waiting for a reply (else they time out).
    """
    config = AsyLPGConfig(lr=0.1, grad_bits=4 if group.rank == 2 else 8)
    if group.rank == 0:
        try:
            await serve(group, np.zeros(DIM), config, timeout=60)
        except FrameError:
            pass
    else:
        worker = Worker(group, DIM, config, timeout=60)
        await worker.pull()
        await worker.push(np.ones(DIM))
        await worker.close()
    await group.barrier(timeout=60)


@pytest.fixture(scope="module")
def least_squares_run(job) -> tuple[list, list[list]]:
    """Every least-squares session: (server results, workers' stats)."""
    server, *workers = (results["least_squares"] for results in job)
    return server, list(workers)


def test_least_squares_converges_and_every_message_has_its_formula_size(least_squares_run) -> None:
    server, workers = least_squares_run
    shards = [least_squares_shard(rank) for rank in range(1, RANKS)]
    solution = np.linalg.lstsq(np.vstack([f for f, _ in shards]), np.concatenate([t for _, t in shards]),
                               rcond=None)[0]
    for index, options in enumerate(PRECISIONS):
        config = AsyLPGConfig(**options)
        params, stats = server[index]
        assert np.linalg.norm(params - solution) < 1e-2 * np.linalg.norm(solution), options
        pushes = sum(worker[index].pushes for worker in workers)
        assert stats.updates + stats.refused == pushes == STEPS * (RANKS - 1)
        for worker in workers:
            mine = worker[index]
            # one pull and one DONE (header only), then a push each step; a reply to each pull and push
            assert mine.bytes_pushed == 2 * MESSAGE_HEADER_BYTES + mine.pushes * config.push_bytes(DIM)
            assert mine.bytes_pulled == (mine.pulls + mine.pushes) * config.pull_bytes(DIM)
        assert stats.bytes_received == sum(worker[index].bytes_pushed for worker in workers)
        assert stats.bytes_sent == sum(worker[index].bytes_pulled for worker in workers)
    full, four_bit = AsyLPGConfig(**PRECISIONS[0]), AsyLPGConfig(**PRECISIONS[2])
    assert four_bit.push_bytes(DIM) == 16 + 50 + 4 and full.push_bytes(DIM) == 16 + 400
    assert AsyLPGConfig(**PRECISIONS[3]).push_bytes(DIM) == 16 + 4 * 25 + 13 + 4


def test_the_staleness_bound_refuses_old_gradients_and_only_those(least_squares_run) -> None:
    server, workers = least_squares_run
    first = len(PRECISIONS)
    (_, below), (_, at) = server[first:]
    # τ = STALE_BY - 1: only rank 3's first push is too old (the others' are at most STALE_STEPS old)
    assert below.refused == 1 and workers[2][first].refused == 1
    assert below.max_applied_staleness <= STALE_STEPS < STALE_BY - 1
    assert below.updates + below.refused == STALE_STEPS * (RANKS - 1)
    # τ = STALE_BY: the same push is exactly τ old, and accepted
    assert at.refused == 0 and at.max_applied_staleness == STALE_BY
    assert sum(at.staleness_histogram.values()) == at.updates == STALE_STEPS * (RANKS - 1)


ENCODINGS = ["direct", "delta"]
ONE_WORKER_SESSIONS = {
    "direct": dict(lr=0.2, param_bits=4, grad_bits=8, param_encoding="direct"),
    "delta": dict(lr=0.2, param_bits=4, grad_bits=8, param_encoding="delta"),
    "sparse": dict(lr=1.0, param_bits=32, grad_bits=8, density=0.05),
    "momentum": dict(lr=0.1, param_bits=32, grad_bits=32, momentum=0.5),
}
SIZE, PUSHES = 700, 3


def fixed_gradient(step: int) -> np.ndarray:
    return np.random.default_rng(step).normal(size=SIZE)


async def one_worker(group):
    """Rank 1 pushes fixed gradients to rank 0, one session per ONE_WORKER_SESSIONS entry.

    The worker returns (its copy before the last reply, its copy after, its version, its
    error-feedback residual), after checking that bad calls raise before anything is sent.
    """
    results = []
    initial = np.random.default_rng(1).normal(size=SIZE)
    for options in ONE_WORKER_SESSIONS.values():
        config = AsyLPGConfig(**options)
        if group.rank == 0:
            results.append(await serve(group, initial, config, timeout=60))
        else:
            with pytest.raises(InvalidArgumentError):
                Worker(group, SIZE, config, server=1)  # itself
            worker = Worker(group, SIZE, config, timeout=60)
            with pytest.raises(InvalidArgumentError):
                await worker.push(fixed_gradient(0))  # before the first pull
            params = await worker.pull()
            with pytest.raises(InvalidArgumentError):
                await worker.push(np.zeros(SIZE + 1))
            for step in range(PUSHES):
                previous = params.copy()
                params = await worker.push(fixed_gradient(step))
            await worker.close()
            results.append((previous, params, worker.version, worker.residual))
        await group.barrier()
    return dict(zip(ONE_WORKER_SESSIONS, results))


@pytest.fixture(scope="module")
def one_worker_run(job) -> tuple[dict, dict]:
    """Every one-worker session: (server results, worker results)."""
    return job[0]["one_worker"], job[1]["one_worker"]


def test_sparse_pushes_lose_nothing_to_error_feedback(one_worker_run) -> None:
    server, worker = one_worker_run
    final, stats = server["sparse"]
    initial = np.random.default_rng(1).normal(size=SIZE)
    pushed = sum(fixed_gradient(step) for step in range(PUSHES))
    residual = worker["sparse"][3]
    # lr = 1: what the server subtracted plus what the worker still holds is every gradient
    np.testing.assert_allclose((initial - final) + residual, pushed, atol=1e-9)
    assert stats.updates == PUSHES and np.count_nonzero(initial - final) <= PUSHES * 35


def test_accelerated_step_is_nesterov_extrapolation(one_worker_run) -> None:
    server, _ = one_worker_run
    final, _ = server["momentum"]
    config = AsyLPGConfig(**ONE_WORKER_SESSIONS["momentum"])
    params = lookahead = np.random.default_rng(1).normal(size=SIZE)
    for step in range(PUSHES):
        gradient = fixed_gradient(step).astype(np.float32).astype(np.float64)
        ahead = params - config.lr * gradient
        params, lookahead = ahead + config.momentum * (ahead - lookahead), ahead
    np.testing.assert_allclose(final, params, rtol=0, atol=1e-12)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_workers_compute_at_quantized_parameters_within_the_rounding_bound(encoding: str, one_worker_run) -> None:
    (exact, stats), (previous, seen, version, _) = one_worker_run[0][encoding], one_worker_run[1][encoding]
    assert version == stats.updates == PUSHES
    steps = grid_steps(4)
    blocks = lambda v: np.pad(v, (0, -v.size % 256)).reshape(-1, 256)  # noqa: E731
    # the rounded quantity: x itself (direct), or x minus the worker's previous copy (delta)
    rounded = exact if encoding == "direct" else exact - previous
    bound = np.repeat(np.abs(blocks(rounded)).max(axis=1) * 2 / steps, 256)[:exact.size]
    error = np.abs(seen - exact)
    assert np.all(error <= bound * (1 + 1e-6))
    assert np.count_nonzero(error) > exact.size // 2  # quantized, not sent as is
    if encoding == "direct":  # on the 4-bit grid: at most 2^4 - 1 values a block
        assert max(np.unique(block).size for block in blocks(seen)) <= steps + 1
    else:  # the delta stream's copy is far closer than one rounding of x itself
        direct_bound = np.abs(exact).max() * 2 / steps
        assert error.max() < direct_bound / 4


async def die_mid_training(group, victim: int):
    """Train until rank ``victim`` exits the process; return the error each survivor sees."""
    config = AsyLPGConfig(lr=0.01)
    try:
        if group.rank == 0:
            if victim == 0:
                asyncio.get_running_loop().call_later(1.0, os._exit, 1)
            return await serve(group, np.zeros(DIM), config, timeout=60)
        features, targets = least_squares_shard(group.rank)
        worker = Worker(group, DIM, config, timeout=60)
        params = await worker.pull()
        for step in range(100_000):
            if group.rank == victim and step == 20:
                os._exit(1)
            params = await worker.push(features.T @ (features @ params - targets) / ROWS)
    except (PeerLostError, GroupAbortedError) as error:
        return type(error).__name__
    return "finished"


@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "server"])
def test_a_dead_rank_fails_every_other_rank_with_a_named_error(victim: int) -> None:
    outcomes = run_ranks(3, die_mid_training, victim, timeout=60, expect_dead=[victim])
    survivors = [outcome for rank, outcome in enumerate(outcomes) if rank != victim]
    assert all(outcome in ("PeerLostError", "GroupAbortedError") for outcome in survivors), survivors


@pytest.mark.parametrize("options", [dict(lr=0), dict(lr=0.1, param_bits=3), dict(lr=0.1, density=0),
                                     dict(lr=0.1, momentum=1.0), dict(lr=0.1, staleness=-1),
                                     dict(lr=0.1, param_encoding="absolute")])
def test_config_refuses_what_the_algorithm_cannot_use(options: dict) -> None:
    with pytest.raises(InvalidArgumentError):
        AsyLPGConfig(**options)


@pytest.mark.parametrize("bits", [32, 8, 4, 2, 1])
@pytest.mark.parametrize("size", [1, 255, 256, 1000])
def test_values_round_trip_at_their_formula_size(bits: int, size: int) -> None:
    config = AsyLPGConfig(lr=0.1, grad_bits=bits)
    codec = None if bits == 32 else QuantizeCodec(bits)
    values = np.random.default_rng(size).normal(size=size)
    message = frame(Kind.PUSH, 7, encode_values(values, bits, codec, 0))
    assert message.nbytes == config.push_bytes(size)
    kind, version, body = parse(message, 1, 0)
    assert (kind, version) == (Kind.PUSH, 7)
    decoded = decode_values(body, size, bits, codec, config, 1, 0)
    limit = 1e-6 if bits == 32 else 2 * np.abs(values).max() / grid_steps(bits)
    assert np.abs(decoded - values).max() <= limit * (1 + 1e-6) + 1e-7


def test_malformed_messages_raise_frame_error() -> None:
    config = AsyLPGConfig(lr=0.1, grad_bits=8)
    with pytest.raises(FrameError):
        parse(np.zeros(8, np.uint8), 1, 0)  # shorter than the header
    with pytest.raises(FrameError):
        parse(np.array([99, 0], np.int64).view(np.uint8), 1, 0)  # unknown kind
    with pytest.raises(FrameError):
        decode_values(np.zeros(10, np.uint8), 100, 8, QuantizeCodec(8), config, 1, 0)  # wrong length
    with pytest.raises(FrameError):
        split_indices(np.array([5, 100], np.uint32).view(np.uint8), 2, 100, 1, 0)  # index outside the model


DIGITS_PRECISIONS = [dict(param_bits=32, grad_bits=32), dict(param_bits=8, grad_bits=8), dict(param_bits=4, grad_bits=4)]


def train_digits(group, epochs: int) -> list:
    """A torch MLP on sklearn's digits, one session per precision: rank 0 serves, the rest train."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from sparsecoll.ps.torch_model import ModelWorker, serve_model

    torch.set_num_threads(1)
    features, labels = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split((features / 16).astype(np.float32), labels,
                                                        test_size=0.3, random_state=0, stratify=labels)
    results = []
    for options in DIGITS_PRECISIONS:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        config = AsyLPGConfig(lr=0.1, **options)
        if group.rank == 0:
            stats = serve_model(group, model, config, timeout=60)
            with torch.no_grad():
                predicted = model(torch.from_numpy(test_x)).argmax(1).numpy()
            results.append((float((predicted == test_y).mean()), stats.updates))
        else:
            worker = ModelWorker(group, model, config, timeout=60)
            mine = np.arange(group.rank - 1, len(train_y), group.size - 1)
            inputs, targets = torch.from_numpy(train_x[mine]), torch.from_numpy(train_y[mine])
            order = np.random.default_rng(group.rank)
            for _ in range(epochs):
                for batch in np.array_split(order.permutation(mine.size), mine.size // 32):
                    model.zero_grad()
                    torch.nn.functional.cross_entropy(model(inputs[batch]), targets[batch]).backward()
                    worker.step()
            worker.close()
            results.append(worker.stats)
        group.barrier()
    return results


def test_digits_training_at_8_and_4_bits_stays_within_a_point_and_a_half_of_full_precision(job) -> None:
    server, *workers = (results["digits"] for results in job)
    (full, updates), *quantized = server
    assert full > 0.92 and updates == sum(worker[0].pushes - worker[0].refused for worker in workers)
    for options, (accuracy, _) in zip(DIGITS_PRECISIONS[1:], quantized):
        assert accuracy >= full - 0.015, (options, accuracy, full)
    size = 64 * 64 + 64 + 64 * 10 + 10
    for index, options in enumerate(DIGITS_PRECISIONS):
        stats = workers[0][index]
        assert stats.bytes_pulled == (stats.pulls + stats.pushes) * AsyLPGConfig(lr=0.1, **options).pull_bytes(size)
    full_push, eight_bit_push = (workers[0][i].bytes_pushed / workers[0][i].pushes for i in (0, 1))
    assert 3.9 < full_push / eight_bit_push < 4.0


def test_ranks_that_disagree_on_the_bits_raise_on_every_rank(job) -> None:
    # a push of the wrong size is refused before it is read, and the group carries the error
    assert [results["disagreement"] for results in job] == ["FrameError"] * RANKS
