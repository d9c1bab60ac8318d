"""``algorithm="auto"`` without a calibration file: rank 0 warns once, and the group measures its
own latency, bandwidth and selection cost on the first call, the same model on every rank."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from sparsecoll.collectives.auto import ONLINE_PROBE_CALLS, shared_cost_model
from sparsecoll.collectives.cost_model import DEFAULT_MODEL, ENV_PATH, CostModel
from tests.ranks import run_ranks


async def first_auto_calls(group) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = await shared_cost_model(group, timeout=60)
        after_first = group.seq
        again = await shared_cost_model(group, timeout=60)
        child = await group.split(0)
        child_model = await shared_cost_model(child, timeout=60)
        result, _ = await group.reduce_gradient(np.ones(20_000, np.float32), "auto", density=0.01)
    return {"model": model.to_array().tolist(), "link": model.link, "seq": after_first,
            "cached": again is model, "child": child_model.link, "sum": float(result.dense().sum()),
            "warnings": [str(warning.message) for warning in caught if issubclass(warning.category, RuntimeWarning)]}


def test_without_a_file_auto_calibrates_online_and_warns_once(tmp_path: Path) -> None:
    results = run_ranks(2, first_auto_calls, timeout=120, env={ENV_PATH: str(tmp_path / "none.json")})
    assert all(isinstance(result, dict) for result in results), results
    zero, one = results
    assert zero["model"] == one["model"]  # the slowest rank's times: one model on every rank
    model = CostModel.from_array(np.array(zero["model"]))
    assert model.alpha != DEFAULT_MODEL.alpha and model.beta != DEFAULT_MODEL.beta
    assert model.select_per_element != DEFAULT_MODEL.select_per_element
    assert model.sketch_per_element == DEFAULT_MODEL.sketch_per_element  # not measured: kept
    assert 0 < model.alpha < 1 and 0 < model.beta < 1e-6  # loopback: under a second, over 1 MB/s
    assert zero["link"] == one["link"] == "measured online by algorithm='auto'" == zero["child"]
    assert zero["seq"] == one["seq"] == 1 + ONLINE_PROBE_CALLS and zero["cached"]
    assert len(zero["warnings"]) == 1 and "sparsecoll-bench calibrate" in zero["warnings"][0]
    assert one["warnings"] == []  # rank 0 speaks for the group, once per process
    assert zero["sum"] == one["sum"] > 0


async def with_a_file(group) -> tuple[int, str, int]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = await shared_cost_model(group, timeout=60)
    return group.seq, model.link, len(caught)


def test_with_a_file_auto_neither_probes_nor_warns(tmp_path: Path) -> None:
    path = CostModel(alpha=7e-6, beta=1e-9, link="file").save(tmp_path / "model.json")
    results = run_ranks(2, with_a_file, timeout=60, env={ENV_PATH: str(path)})
    assert results == [(1, "rank 0's cost model", 0)] * 2
