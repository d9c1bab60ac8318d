"""The cost model's bytes (:mod:`sparsecoll.collectives.cost_bytes`) against what real ranks'
CommStats count, flat and two-level.

One spawn of 6 ranks in 3 hosts of 2 (SPARSECOLL_HOST_ID); its first P ranks form the group
of each P = 2..6 (powers of two and not: the folds of recursive doubling, uneven ring chunks).
Every flat algorithm the model prices exactly (dense by recursive doubling and by the ring,
allgather, gTop-k, CLT-k, sketch) must send, summed over the ranks, P times the model's mean; the two-level calls on 2 and 3 hosts must send between hosts exactly what
the model says (inside the host too, for dense and CLT-k, whose step 1 sends whole shards).
"""

from __future__ import annotations

import numpy as np
import pytest

from sparsecoll.collectives.auto import shared_cost_model
from sparsecoll.collectives.cost_bytes import TWO_LEVEL_ALGORITHMS, bytes_sent, two_level_bytes
from sparsecoll.collectives.cost_model import CostModel
from sparsecoll.collectives.reduce import pick_algorithm
from tests.ranks import run_ranks

WORLD, PER_HOST = 6, 2
SMALL, LARGE, K = 3000, 40_000, 30
"""SMALL float32 values go by recursive doubling (<= 64 KiB), LARGE by the ring."""
FLAT = (("dense", SMALL), ("dense", LARGE), ("allgather", SMALL), ("gtopk", SMALL), ("cltk", SMALL),
        ("sketch", LARGE))
TWO_LEVEL = (("dense", LARGE), ("allgather", SMALL), ("gtopk", SMALL), ("cltk", SMALL))
AUTO_MODEL, AUTO_DENSITY = CostModel(alpha=1e-6, beta=8e-10), 0.01
"""A link on which 2 hosts of 2 change algorithm="auto"'s pick: CLT-k flat, Ok-Topk (flat) once
the others are priced two-level, and among the two-level algorithms alone another one."""


def gradient(rank: int, size: int) -> np.ndarray:
    return np.random.default_rng(rank).standard_t(2, size).astype(np.float32)


async def measure(group) -> dict:
    """{(P, algorithm, size, two-level?): (bytes sent, of those to other hosts)} for this rank."""
    sent = {}
    for world in range(2, WORLD + 1):
        sub = group.new_group(range(world))
        if sub is None:
            continue
        for algorithm, size in FLAT:
            _, stats = await sub.reduce_gradient(gradient(group.rank, size), algorithm, k=K)
            sent[world, algorithm, size, False] = (stats.bytes_sent, 0)
        if world % PER_HOST == 0 and world > PER_HOST:
            for algorithm, size in TWO_LEVEL:
                _, stats = await sub.reduce_gradient(gradient(group.rank, size), algorithm, k=K, hierarchical=True)
                sent[world, algorithm, size, True] = (stats.bytes_sent, stats.inter_host_bytes_sent)
        if world == 4:
            await shared_cost_model(sub, AUTO_MODEL)
            grad = gradient(group.rank, LARGE)
            sent["auto"] = [await pick_algorithm(sub, grad, density=AUTO_DENSITY, hierarchical=mode)
                            for mode in (False, "auto", True)]
    return sent


@pytest.fixture(scope="module")
def measured() -> list[dict]:
    env = {rank: {"SPARSECOLL_HOST_ID": f"host-{rank // PER_HOST}"} for rank in range(WORLD)}
    return run_ranks(WORLD, measure, timeout=240, per_rank_env=env)


@pytest.mark.parametrize(("algorithm", "size"), FLAT)
def test_flat_bytes_are_what_ranks_send(measured: list[dict], algorithm: str, size: int) -> None:
    for world in range(2, WORLD + 1):
        total = sum(measured[rank][world, algorithm, size, False][0] for rank in range(world))
        assert total == pytest.approx(world * bytes_sent(algorithm, world, size, K), rel=1e-12), (world, total)


@pytest.mark.parametrize(("algorithm", "size"), TWO_LEVEL)
def test_two_level_bytes_are_what_ranks_send(measured: list[dict], algorithm: str, size: int) -> None:
    for world in (4, 6):
        model = two_level_bytes(algorithm, world // PER_HOST, PER_HOST, size, K)
        inter = sum(measured[rank][world, algorithm, size, True][1] for rank in range(world))
        total = sum(measured[rank][world, algorithm, size, True][0] for rank in range(world))
        assert inter == pytest.approx(world * model.inter_host, rel=1e-12), (world, inter)
        if algorithm in ("dense", "cltk"):  # step 1 sends whole shards: no data-dependent piece sizes
            assert total == pytest.approx(world * model.total, rel=1e-12), (world, total)


def test_auto_prices_a_two_level_call_two_level(measured: list[dict]) -> None:
    """On 2 hosts of 2, "auto" picks by the two-level prices when the call will run two-level,
    among the two-level algorithms only with hierarchical=True; the same pick on every rank."""
    k = round(LARGE * AUTO_DENSITY)
    flat = AUTO_MODEL.choose(4, LARGE, k)
    two_level = AUTO_MODEL.choose(4, LARGE, k, two_level=(2, 2))
    only = AUTO_MODEL.choose(4, LARGE, k, TWO_LEVEL_ALGORITHMS, two_level=(2, 2))
    assert len({flat, two_level, only}) == 3  # the link is chosen so that each rule matters
    assert all(measured[rank]["auto"] == [flat, two_level, only] for rank in range(4))
