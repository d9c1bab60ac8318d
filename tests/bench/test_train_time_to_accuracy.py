"""Time to target accuracy on recorded curves: the first evaluation at or above the dense run's
final accuracy less half a point, training seconds only; "-" (None) when never reached."""

from __future__ import annotations

import pytest

from sparsecoll.bench.time_to_accuracy import add_time_to_target, dense_baseline, time_to_target
from sparsecoll.bench.train_methods import ring_payload

# (step, training seconds, test accuracy), as train_loop records them
DDP_CURVE = [[10, 1.0, 0.80], [20, 2.0, 0.905], [30, 3.0, 0.93], [40, 4.0, 0.925]]
"""DDP dense ends at 92.5%: the target is 92.0%, first reached at step 30, 3.0 s."""


def rows() -> list[dict]:
    return [
        {"method": "ddp", "algorithm": "allreduce", "accuracy": 0.925, "curve": DDP_CURVE},
        {"method": "powersgd", "rank": 1, "accuracy": 0.921, "curve": [[10, 0.5, 0.7], [20, 1.0, 0.921]]},
        {"method": "powersgd", "rank": 4, "accuracy": 0.93, "curve": [[10, 0.8, 0.92], [20, 1.6, 0.93]]},
        # at the target exactly: reached
        {"method": "optimizer", "algorithm": "gtopk", "accuracy": 0.92, "curve": [[10, 0.2, 0.5], [20, 0.4, 0.92]]},
        # above it once, then below: the first time counts
        {"method": "hook", "algorithm": "cltk", "accuracy": 0.90, "curve": [[10, 0.3, 0.95], [20, 0.6, 0.90]]},
        {"method": "optimizer", "algorithm": "allgather", "accuracy": 0.919, "curve": [[10, 0.1, 0.919]]},
        # sparsecoll's own dense run: DDP's accuracy, not this one's, sets the target
        {"method": "optimizer", "algorithm": "dense", "accuracy": 0.95, "curve": [[10, 5.0, 0.95]]},
    ]


def test_each_row_gets_its_first_time_at_the_target_and_ratios_to_ddp_and_the_best_powersgd() -> None:
    table = rows()
    target = add_time_to_target(table)
    assert target == pytest.approx(0.92)
    times = [row["time_to_target"] for row in table]
    assert times == [3.0, 1.0, 0.8, 0.4, 0.3, None, 5.0]
    assert [row["steps_to_target"] for row in table] == [30, 20, 10, 20, 10, None, 10]
    assert [row["tta_vs_ddp"] for row in table[:5]] == pytest.approx([1.0, 3.0, 3.75, 7.5, 10.0])
    # PowerSGD's best (rank 4, 0.8 s) is the yardstick, not the first PowerSGD row
    assert [row["tta_vs_powersgd"] for row in table[:5]] == pytest.approx([0.8 / 3.0, 0.8, 1.0, 2.0, 0.8 / 0.3])
    assert table[5]["tta_vs_ddp"] is None and table[5]["tta_vs_powersgd"] is None
    assert table[6]["tta_vs_ddp"] == pytest.approx(0.6)


def test_the_curve_is_read_in_order_and_nothing_reached_is_none() -> None:
    assert time_to_target(DDP_CURVE, 0.9) == (2.0, 20)
    assert time_to_target(DDP_CURVE, 0.80) == (1.0, 10)
    assert time_to_target(DDP_CURVE, 0.931) is None
    assert time_to_target([], 0.5) is None
    # 49/1000 - 0.005 is a little above 44/1000 in floating point: 44 of 1000 right is still the target
    assert 49 / 1000 - 0.005 > 44 / 1000 and time_to_target([[7, 1.5, 44 / 1000]], 49 / 1000 - 0.005) == (1.5, 7)


def test_without_ddp_sparsecolls_dense_run_sets_the_target_and_without_any_dense_none() -> None:
    table = [row for row in rows() if row["method"] != "ddp"]
    assert dense_baseline(table) is table[-1]
    assert add_time_to_target(table) == pytest.approx(0.945)
    assert [row["time_to_target"] for row in table] == [None, None, None, 0.3, None, 5.0]
    assert all(row["tta_vs_ddp"] is None for row in table)
    assert add_time_to_target([row for row in table if row.get("algorithm") != "dense"]) is None


@pytest.mark.parametrize(("world", "factor"), [(2, 1.0), (4, 1.5), (8, 1.75)])
def test_a_ring_allreduce_sends_2_p_minus_1_over_p_of_what_it_reduces(world: int, factor: float) -> None:
    assert ring_payload(1000, 4, world) == pytest.approx(4000 * factor)
