"""``calibrate_one_core``: the local costs of one rank on one core, what SharedCores scales."""

from __future__ import annotations

import numba

from sparsecoll.bench.calibrate import calibrate_one_core
from sparsecoll.collectives.cost_contention import LOCAL_COSTS


def test_one_core_costs_are_measured_and_the_threads_restored() -> None:
    threads = numba.get_num_threads()
    model = calibrate_one_core(iterations=3)
    assert numba.get_num_threads() == threads
    assert model.alpha == model.beta == 0.0 and model.ranks == 1
    for name in LOCAL_COSTS:
        assert getattr(model, name) >= 0.0
    assert model.merge_per_pair > 0 and model.sketch_per_element > 0 and model.reduce_per_element > 0
    assert model.select(1 << 23) > model.select(1 << 20)  # more elements cost more (min of 3 runs each)
    # a top-k over 8M elements on one core costs a few ms on any current CPU, not seconds or nothing
    assert 1e-4 < model.select(1 << 23) < 1.0
