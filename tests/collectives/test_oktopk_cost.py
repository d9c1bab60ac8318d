"""The cost model prices Ok-Topk at the paper's bound: 6k(P-1)/P numbers a rank, whatever P."""

from __future__ import annotations

import dataclasses

import pytest

from sparsecoll.collectives.cost_model import DEFAULT_MODEL
from sparsecoll.wire import HEADER_SIZE

SIZE, K = 25_000_000, 25_000


def wire_bytes(algorithm: str, ranks: int, bits: int | None = None) -> float:
    """Bytes on the critical path: the model's time with β = 1 s/B less its time with β = 0."""
    slow = dataclasses.replace(DEFAULT_MODEL, beta=1.0)
    free = dataclasses.replace(DEFAULT_MODEL, beta=0.0)
    return slow.predict(algorithm, ranks, SIZE, K, bits) - free.predict(algorithm, ranks, SIZE, K, bits)


@pytest.mark.parametrize("ranks", [2, 3, 4, 8, 16, 64])
def test_oktopk_bytes_are_the_papers_bound(ranks: int) -> None:
    numbers = 6 * K * (ranks - 1) / ranks  # indices and values, 4 bytes each
    frames = 2 * (ranks - 1) + 1
    counts = (ranks - 1).bit_length() * (HEADER_SIZE + 8 * ranks)  # the counts' allreduce, about
    # the rest (under 2%) is the estimations' histograms, amortized over the interval
    assert wire_bytes("oktopk", ranks) == pytest.approx(4 * numbers + frames * (HEADER_SIZE + 8) + counts, rel=0.02)


def test_oktopk_stays_flat_in_p_where_allgather_and_gtopk_grow() -> None:
    assert wire_bytes("oktopk", 64) < 1.05 * 6 * K * 4  # below the bound's limit 6k numbers, plus headers
    assert wire_bytes("gtopk", 64) > 1.9 * wire_bytes("gtopk", 8)
    assert wire_bytes("allgather", 64) > 8 * wire_bytes("allgather", 8)
    assert wire_bytes("oktopk", 64) < wire_bytes("gtopk", 64) < wire_bytes("allgather", 64)
    assert wire_bytes("oktopk", 8, bits=4) < wire_bytes("oktopk", 8)


def test_auto_picks_oktopk_on_a_slow_link_with_many_ranks() -> None:
    slow = dataclasses.replace(DEFAULT_MODEL, beta=8e-9)  # 1 Gbit/s
    assert slow.choose(64, SIZE, K) == "oktopk"
    assert slow.choose(2, SIZE, K) != "oktopk"  # at P = 2 its three phases cost more than one exchange
