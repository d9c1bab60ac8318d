"""The cost model's bytes (:mod:`sparsecoll.collectives.cost_bytes`) against what real ranks'
CommStats count, flat and two-level.

One spawn of 6 ranks in 3 hosts of 2 (SPARSECOLL_HOST_ID); its first P ranks form the group
of each P = 2..6 (powers of two and not: the folds of recursive doubling, uneven ring chunks).
Every flat algorithm the model prices exactly (dense by recursive doubling and by the ring,
allgather, gTop-k, CLT-k, sketch; allgather and gTop-k with quantized values too) must send,
summed over the ranks, P times the model's mean; the two-level calls on 2 and 3 hosts must send
between hosts exactly what the model says (inside the host too, for dense and CLT-k, whose step
1 sends whole shards). The byte break-even of a sparse call against a dense allreduce (what
``dense_above="auto"`` uses) follows from those formulas.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparsecoll.collectives.auto import shared_cost_model
from sparsecoll.collectives.cost_bytes import (
    TWO_LEVEL_ALGORITHMS,
    bytes_sent,
    dense_bytes,
    sparse_break_even,
    two_level_bytes,
)
from sparsecoll.collectives.cost_model import CostModel
from sparsecoll.collectives.reduce import pick_algorithm
from tests.ranks import run_ranks

WORLD, PER_HOST = 6, 2
SMALL, LARGE, K = 3000, 40_000, 30
"""SMALL float32 values go by recursive doubling (<= 64 KiB), LARGE by the ring."""
FLAT = (("dense", SMALL), ("dense", LARGE), ("allgather", SMALL), ("gtopk", SMALL), ("cltk", SMALL),
        ("sketch", LARGE))
QUANTIZED = (("allgather", 8), ("allgather", 2), ("gtopk", 8))
"""Pairs with quantized values (SMALL values, K pairs), at these bits."""
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
        for algorithm, bits in QUANTIZED:
            _, stats = await sub.reduce_gradient(gradient(group.rank, SMALL), algorithm, k=K, quantize_bits=bits)
            sent[world, algorithm, bits] = stats.bytes_sent
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


@pytest.mark.parametrize(("algorithm", "bits"), QUANTIZED)
def test_quantized_pairs_bytes_are_what_ranks_send(measured: list[dict], algorithm: str, bits: int) -> None:
    for world in range(2, WORLD + 1):
        total = sum(measured[rank][world, algorithm, bits] for rank in range(world))
        assert total == pytest.approx(world * bytes_sent(algorithm, world, SMALL, K, bits=bits), rel=1e-12), world
    assert bytes_sent(algorithm, 4, SMALL, K, bits=bits) < bytes_sent(algorithm, 4, SMALL, K)


@pytest.mark.parametrize("ranks", [2, 3, 4, 8, 16, 32])
def test_allgather_breaks_even_with_a_dense_allreduce_at_one_over_p(ranks: int) -> None:
    """Its pairs cross P - 1 links, twice a value's bytes each; the ring sends 2(P-1)/P values:
    1/P against float32, 1/(2P) against float16 (frame headers aside)."""
    size = 1_200_000
    assert sparse_break_even("allgather", ranks, size) == pytest.approx(1 / ranks, rel=1e-3)
    assert sparse_break_even("allgather", ranks, size, dense_itemsize=2) == pytest.approx(0.5 / ranks, rel=1e-3)
    assert sparse_break_even("allgather", ranks, size, bits=8) > 1.5 / ranks  # ~5 bytes a pair, not 8


@pytest.mark.parametrize(("algorithm", "ranks", "size", "bits"), [("allgather", 4, 1_200_000, None),
                                                                  ("gtopk", 4, 1_200_000, None),
                                                                  ("gtopk", 6, 50_001, 4),
                                                                  ("allgather", 16, 3000, 8)])
def test_the_break_even_is_the_last_density_within_the_dense_bytes(algorithm: str, ranks: int, size: int,
                                                                   bits: int | None) -> None:
    k = round(sparse_break_even(algorithm, ranks, size, bits=bits) * size)
    dense = dense_bytes(ranks, size)
    assert bytes_sent(algorithm, ranks, size, k, bits=bits) <= dense < bytes_sent(algorithm, ranks, size, k + 1,
                                                                                    bits=bits)


def test_gtopk_breaks_even_later_than_allgather_and_others_have_no_break_even() -> None:
    """gTop-k's pairs cross log2 P links, not P - 1; sketch, CLT-k and the rest are not priced."""
    for ranks in (4, 8, 32):
        assert sparse_break_even("gtopk", ranks, 10**6) > sparse_break_even("allgather", ranks, 10**6)
    assert sparse_break_even("sketch", 4, 10**6) is None and sparse_break_even("cltk", 4, 10**6) is None
    assert sparse_break_even("allgather", 1, 10**6) == 1.0


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
