"""``train_configuration`` reports progress (what the stall watchdog hears) at the warm-up, every
step and every evaluation, on a group of one; a row that takes steps never looks stalled."""

from __future__ import annotations

import pytest

from sparsecoll.bench.train_loop import Plan, WireCounter, train_configuration
from sparsecoll.bench.train_models import load_dataset
from tests.bench.test_train_baselines import group_of_one  # noqa: F401  (the fixture)


@pytest.mark.parametrize("model", ["mlp", "mlp25m"])
def test_progress_is_reported_at_the_warm_up_every_step_and_every_evaluation(group_of_one,  # noqa: F811
                                                                            model: str) -> None:
    stages: list[str] = []
    if model == "mlp":
        data, plan = load_dataset("digits"), Plan(epochs=1, batch=64, evals_per_epoch=2, compute_steps=2)
        steps = 1437 // 64
    else:
        data, plan, steps = None, Plan(model=model, steps=2, warmup=1, compute_steps=2), 3
    row = train_configuration(group_of_one, data, {"algorithm": "dense", "density": 1.0}, plan, WireCounter(None),
                              stages.append)
    assert stages[0] == "the warm-up step" and not row["cut"]
    assert [stage for stage in stages if stage.startswith("step")] == [f"step {n}" for n in range(1, steps + 1)]
    evaluations = [stage for stage in stages if stage.startswith("the evaluation")]
    assert evaluations == ([f"the evaluation after step {n}" for n in (11, 22)] if model == "mlp" else [])
