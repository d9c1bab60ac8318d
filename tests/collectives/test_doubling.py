"""The recursive-doubling plan pairs every rank consistently for any P."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sparsecoll.collectives.doubling import DoublingPlan
from sparsecoll.collectives.dense import chunk_bounds


@given(st.integers(1, 300))
def test_every_round_pairs_ranks_symmetrically(size: int) -> None:
    plans = [DoublingPlan(rank, size) for rank in range(size)]
    active = [plan for plan in plans if not plan.folded]
    assert len(active) == plans[0].power
    assert sorted(plan.virtual for plan in active) == list(range(plans[0].power))
    for plan in plans:
        if plan.folded:
            assert plans[plan.rank + 1].host
        for round_index in range(plan.rounds if not plan.folded else 0):
            partner = plans[plan.partner(round_index)]
            assert not partner.folded and partner.partner(round_index) == plan.rank


@given(st.integers(0, 10_000), st.integers(1, 64))
def test_chunks_cover_the_array_once(count: int, parts: int) -> None:
    bounds = chunk_bounds(count, parts)
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == count and len(sizes) == parts
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
