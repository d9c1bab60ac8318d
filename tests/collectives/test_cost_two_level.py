"""CostModel.predict_two_level is its three steps: each checked alone by zeroing the others' costs."""

from __future__ import annotations

import dataclasses

import pytest

from sparsecoll.collectives.cost_model import ALGORITHMS, CostModel
from sparsecoll.wire import HEADER_SIZE

FREE = CostModel(alpha=0.0, beta=0.0, select_per_element=0.0, sketch_per_element=0.0, reduce_per_element=0.0,
                 merge_per_pair=0.0, quantize_per_element=0.0)
"""Nothing costs anything: a link or kernel set to a price below is the only one that counts."""
SIZE, K = 1_000_003, 1_001  # neither divides by L: the largest shard (d/L and k/L rounded up) is the slow one


@pytest.mark.parametrize("algorithm", ["dense", "allgather", "gtopk", "cltk"])
@pytest.mark.parametrize(("hosts", "per_host"), [(2, 2), (3, 4), (8, 8)])
def test_between_hosts_is_the_flat_algorithm_on_the_largest_shard(algorithm: str, hosts: int, per_host: int) -> None:
    inter = dataclasses.replace(FREE, alpha=5e-5, beta=8e-9)
    shard, count = -(-SIZE // per_host), -(-K // per_host)
    assert inter.predict_two_level(algorithm, hosts, per_host, SIZE, K, intra=FREE) == \
        pytest.approx(inter.predict(algorithm, hosts, shard, count))


@pytest.mark.parametrize("algorithm", ["dense", "cltk"])
def test_inside_the_host_a_shard_goes_out_and_its_result_comes_back(algorithm: str) -> None:
    intra = dataclasses.replace(FREE, alpha=1e-6, beta=1e-10)
    per_host = 4
    shard, count = -(-SIZE // per_host), -(-K // per_host)
    scatter = (per_host - 1) * intra.message(4 * shard)
    result = 4 * shard if algorithm == "dense" else 8 + 8 * count + (count + 7) // 8
    assert FREE.predict_two_level(algorithm, 4, per_host, SIZE, K, intra=intra) == \
        pytest.approx(scatter + (per_host - 1) * intra.message(result))
    assert intra.message(0) == pytest.approx(1e-6 + HEADER_SIZE * 1e-10)


def test_sparse_two_levels_select_over_the_whole_gradient_then_over_the_shard() -> None:
    local = dataclasses.replace(FREE, select_per_element=1e-9)
    shard = -(-SIZE // 4)
    assert local.predict_two_level("gtopk", 4, 4, SIZE, K) == pytest.approx(1e-9 * (SIZE + shard))


@pytest.mark.parametrize("algorithm", ALGORITHMS[:3])
def test_one_host_or_one_rank_a_host_is_the_flat_algorithm(algorithm: str) -> None:
    inter, intra = CostModel(alpha=5e-5, beta=8e-9), CostModel(alpha=5e-6, beta=8e-11)
    assert inter.predict_two_level(algorithm, 1, 8, SIZE, K, intra=intra) == intra.predict(algorithm, 8, SIZE, K)
    assert inter.predict_two_level(algorithm, 8, 1, SIZE, K, intra=intra) == inter.predict(algorithm, 8, SIZE, K)


def test_choose_prices_what_runs_two_level_so() -> None:
    """With hosts, what runs two-level is priced two-level and the rest flat; the pick is the
    cheapest of those prices; a quantized call runs flat and is priced flat."""
    model = CostModel(alpha=5e-5, beta=8e-9)
    costs = {name: model.price(name, 64, 25_000_000, 25_000, two_level=(8, 8)) for name in ALGORITHMS}
    assert costs["dense"] == model.predict_two_level("dense", 8, 8, 25_000_000, 25_000)
    assert costs["sketch"] == model.predict("sketch", 64, 25_000_000, 25_000)
    assert model.choose(64, 25_000_000, 25_000, two_level=(8, 8)) == min(costs, key=costs.__getitem__)
    assert model.price("gtopk", 64, 25_000_000, 25_000, 8, two_level=(8, 8)) == \
        model.predict("gtopk", 64, 25_000_000, 25_000, 8)
