"""The sparse bench's formula column is the cost model's byte formula: one source of truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsecoll.bench.sparse import formula_bytes, two_level_formula_bytes
from sparsecoll.collectives.cost_bytes import BYTE_FORMULAS, TWO_LEVEL_ALGORITHMS, bytes_sent, two_level_bytes

STORED = Path(__file__).parents[2] / "docs" / "bench" / "oktopk"


@pytest.mark.parametrize("ranks", [2, 3, 5, 8, 32])
def test_the_bench_formula_is_the_models(ranks: int) -> None:
    size, k = 1_000_003, 1_001
    for algorithm in BYTE_FORMULAS:
        assert formula_bytes(algorithm, ranks, size, k) == round(bytes_sent(algorithm, ranks, size, k))
    for algorithm in TWO_LEVEL_ALGORITHMS:
        split = two_level_bytes(algorithm, ranks, 4, 1_000_003, 1_001)
        assert two_level_formula_bytes(algorithm, ranks, 4, 1_000_003, 1_001) == round(split.inter_host)
    assert formula_bytes("gloo", ranks, 1000, 1) == int(2 * (ranks - 1) / ranks * 4000)
    assert formula_bytes("selection", ranks, 1000, 1) == 0 and formula_bytes("registered", ranks, 1000, 1) is None


def test_the_formula_is_what_rank_zero_sent_in_the_stored_runs() -> None:
    """Allgather at every P and gTop-k at P a power of two send the same on every rank: the
    formula (the mean rank's) equals rank 0's measured bytes at P = 2..32, d = 25M."""
    checked = 0
    for name in ("p2-4-8-1gbit.json", "p16-1gbit.json", "p32-1gbit.json"):
        for row in json.loads((STORED / name).read_text())["rows"]:
            if row["algorithm"] in ("allgather", "gtopk"):
                assert formula_bytes(row["algorithm"], row["ranks"], row["d"], row["k"]) == row["bytes_sent"], row
                checked += 1
    assert checked == 10
