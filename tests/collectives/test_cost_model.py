"""The α-β cost model alone: its picks, its shape, its file, and the bench's gap report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecoll.collectives import cost_model
from sparsecoll.collectives.cost_model import (
    ALGORITHMS,
    DEFAULT_MODEL,
    CostModel,
    auto_gap,
)
from sparsecoll.errors import InvalidArgumentError

FAST = CostModel(alpha=5e-6, beta=8e-11, link="100 Gbit/s")
SLOW = CostModel(alpha=50e-6, beta=8e-9, link="1 Gbit/s")
SHARED_CORES = CostModel(alpha=4e-4, beta=8e-9, select_per_element=2e-9, select_fixed=8e-3,
                         lone_select_ratio=0.55, sketch_per_element=4e-8, reduce_per_element=7e-10,
                         merge_per_pair=2e-8, link="1 Gbit/s, 4 ranks on 2 cores")
RESNET50 = 25_000_000


@pytest.mark.parametrize("ranks", [2, 4, 8])
@pytest.mark.parametrize("size", [1 << 20, RESNET50])
def test_fast_link_at_high_density_goes_dense(ranks: int, size: int) -> None:
    assert FAST.choose(ranks, size, size // 4) == "dense"


@pytest.mark.parametrize("model", [SLOW, CostModel(beta=8e-9), SHARED_CORES])
def test_slow_link_at_low_density_goes_sparse(model: CostModel) -> None:
    k = RESNET50 // 1000
    assert model.choose(4, RESNET50, k, ("dense", "allgather", "gtopk", "sketch")) in ("gtopk", "allgather")
    # with CLT-k in the race it may win (it sends about 2.5k values); dense and sketch never do
    assert model.choose(4, RESNET50, k) in ("gtopk", "allgather", "cltk")
    assert model.predict("dense", 4, RESNET50, k) > 10 * model.predict("gtopk", 4, RESNET50, k)


def test_gtopk_overtakes_allgather_as_ranks_grow() -> None:
    k = RESNET50 // 1000
    assert SLOW.predict("allgather", 2, RESNET50, k) == SLOW.predict("gtopk", 2, RESNET50, k)  # one exchange
    assert SLOW.choose(8, RESNET50, k, ("allgather", "gtopk")) == "gtopk"


def test_one_rank_needs_no_communication() -> None:
    assert SLOW.predict("dense", 1, RESNET50, 10) == 0.0
    assert SLOW.choose(1, RESNET50, 10) == "dense"


def test_shared_cores_make_the_lone_leader_cheaper() -> None:
    k = RESNET50 // 1000
    alone = SHARED_CORES.predict("cltk", 4, RESNET50, k)
    together = CostModel(**{**SHARED_CORES.__dict__, "lone_select_ratio": 1.0}).predict("cltk", 4, RESNET50, k)
    assert alone < together


@settings(max_examples=60, deadline=None)
@given(algorithm=st.sampled_from(ALGORITHMS), ranks=st.integers(1, 64), size=st.integers(1, 1 << 28),
       growth=st.integers(1, 1 << 20), density=st.floats(1e-4, 1.0))
def test_predict_grows_with_size(algorithm: str, ranks: int, size: int, growth: int, density: float) -> None:
    k = max(1, int(size * density))
    small = DEFAULT_MODEL.predict(algorithm, ranks, size, k)
    if algorithm == "dense" and size * 4 <= cost_model.SMALL_ALLREDUCE_BYTES < (size + growth) * 4:
        growth = 0  # doubling -> ring switch: the implementation's threshold, not the model's
    assert DEFAULT_MODEL.predict(algorithm, ranks, size + growth, k) >= small >= 0.0


@settings(max_examples=60, deadline=None)
@given(algorithm=st.sampled_from(ALGORITHMS[1:]), ranks=st.integers(1, 64), size=st.integers(2, 1 << 28),
       data=st.data())
def test_sparse_predictions_grow_with_k_and_beta(algorithm: str, ranks: int, size: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, size - 1))
    more = data.draw(st.integers(k + 1, size))
    if algorithm != "cltk":  # CLT-k's chain pipelines better once its indices fill two segments
        assert DEFAULT_MODEL.predict(algorithm, ranks, size, more) >= DEFAULT_MODEL.predict(algorithm, ranks, size, k)
    slower = CostModel(beta=DEFAULT_MODEL.beta * 10)
    assert slower.predict(algorithm, ranks, size, k) >= DEFAULT_MODEL.predict(algorithm, ranks, size, k)


@settings(max_examples=40, deadline=None)
@given(ranks=st.integers(1, 64), size=st.integers(1, 1 << 30), data=st.data(),
       bits=st.sampled_from([None, *cost_model.QUANTIZE_BITS]),
       parameters=st.lists(st.floats(0, 1e-2, allow_subnormal=False), min_size=len(cost_model.PARAMETERS),
                           max_size=len(cost_model.PARAMETERS)))
def test_choose_is_the_argmin_and_survives_the_broadcast_format(ranks: int, size: int, data: st.DataObject,
                                                              bits: int | None, parameters: list[float]) -> None:
    k = data.draw(st.integers(1, size))
    model = CostModel.from_array(np.array(parameters))
    pick = model.choose(ranks, size, k, quantize_bits=bits)
    cost = model.predict(pick, ranks, size, k, bits)
    assert all(cost <= model.predict(name, ranks, size, k, bits) for name in ALGORITHMS)
    assert CostModel.from_array(model.to_array()).choose(ranks, size, k, quantize_bits=bits) == pick


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_quantized_values_cost_less_on_a_slow_link(algorithm: str) -> None:
    k = RESNET50 // 1000
    assert SLOW.predict(algorithm, 4, RESNET50, k, 4) < SLOW.predict(algorithm, 4, RESNET50, k)
    assert SLOW.predict(algorithm, 4, RESNET50, k, 1) < SLOW.predict(algorithm, 4, RESNET50, k, 8)


def test_quantized_ring_bytes_match_the_wire_format() -> None:
    assert cost_model.quantized_bytes(256, 8) == 4 + 256
    assert cost_model.quantized_bytes(257, 1) == 8 + 33


@pytest.mark.parametrize("call", [("nope", 4, 10, 1), ("dense", 0, 10, 1), ("gtopk", 4, 10, 11),
                                  ("gtopk", 4, 10, 0), ("gtopk", 4, 10, 1, 3), ("dense", 4, 10, 1, 16)])
def test_bad_calls_are_refused(call: tuple) -> None:
    with pytest.raises(InvalidArgumentError):
        SLOW.predict(*call)
    with pytest.raises(InvalidArgumentError, match="candidate"):
        SLOW.choose(4, 10, 1, ())


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = CostModel(alpha=1e-4, beta=1e-9, select_per_element=2e-9, select_fixed=1e-3, lone_select_ratio=0.5,
                      sketch_per_element=3e-8, reduce_per_element=4e-10, merge_per_pair=5e-8,
                      quantize_per_element=3e-8,
                      date="2026-11-24 12:00 UTC", host="vm", ranks=4, link="loopback")
    path = model.save(tmp_path / "nested" / "model.json")
    assert CostModel.load(path) == model
    assert json.loads(path.read_text())["version"] == cost_model.FORMAT_VERSION


def test_default_location_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(cost_model.ENV_PATH, raising=False)
    assert cost_model.default_path() == tmp_path / "cache" / "sparsecoll" / "cost_model.json"
    assert cost_model.load_default() == DEFAULT_MODEL
    monkeypatch.setenv(cost_model.ENV_PATH, str(tmp_path / "mine.json"))
    assert cost_model.load_default() == DEFAULT_MODEL  # no file yet: defaults
    SLOW.save()
    assert cost_model.load_default() == SLOW
    assert math.isclose(1 / DEFAULT_MODEL.beta * 8, 10e9) and DEFAULT_MODEL.alpha == 50e-6


@pytest.mark.parametrize("text", [
    "not json", "[1, 2]", '{"version": 2, "alpha": 1}', '{"version": 1, "alpha": 1e-5}',
    json.dumps({"version": 1, **{name: 1e-6 for name in cost_model.PARAMETERS}, "alpha": -1.0}),
    json.dumps({"version": 1, **{name: 1e-6 for name in cost_model.PARAMETERS}, "beta": "fast"}),
    json.dumps({"version": 1, **{name: 1e-6 for name in cost_model.PARAMETERS}, "gamma": 1.0}),
    json.dumps({"version": 1, **{name: 1e-6 for name in cost_model.PARAMETERS}, "ranks": 2.5}),
    '{"version": 1, "alpha": NaN}',
])
def test_malformed_files_raise_invalid_argument(tmp_path: Path, text: str) -> None:
    path = tmp_path / "model.json"
    path.write_text(text)
    with pytest.raises(InvalidArgumentError, match="model.json"):
        CostModel.load(path)


def test_auto_gap_reports_the_pick_against_the_best() -> None:
    k = RESNET50 // 1000
    rows = [{"ranks": 4, "d": RESNET50, "k": k, "algorithm": name, "time_ms": ms}
            for name, ms in [("dense", 1283.0), ("gloo", 1283.0), ("allgather", 54.5), ("gtopk", 51.5),
                             ("sketch", 9891.0), ("cltk", 21.4), ("selection", 40.0)]]
    rows.append({"ranks": 2, "d": 1000, "k": 10, "algorithm": "dense", "time_ms": 1.0})
    report = {(row["ranks"], row["d"]): row for row in auto_gap(rows, SLOW)}
    assert set(report) == {(4, RESNET50), (2, 1000)}
    four = report[(4, RESNET50)]
    assert four["best"] == "cltk" and four["best_ms"] == 21.4
    assert four["pick_ms"] == {"allgather": 54.5, "gtopk": 51.5, "cltk": 21.4}[four["pick"]]
    assert math.isclose(four["gap_pct"], 100 * (four["pick_ms"] / 21.4 - 1))
    assert four["predicted_ms"] > 0
    assert report[(2, 1000)]["pick"] == "dense" and report[(2, 1000)]["gap_pct"] == 0.0
    assert {key for key, _header in cost_model.AUTO_GAP_COLUMNS} <= set(four)
