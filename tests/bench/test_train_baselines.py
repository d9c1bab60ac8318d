"""``sparsecoll-bench train`` end to end: torch's DDP and PowerSGD rows beside sparsecoll's
optimizer and DDP hook, in one real run (2 spawned ranks, loopback, Gloo and sparsecoll groups),
and one configuration trained in this process on a group of one for the cap and the
step-time-only model."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsecoll.bench.cli import app
from sparsecoll.bench.train_loop import Plan, WireCounter, train_configuration
from sparsecoll.bench.train_models import load_dataset

runner = CliRunner()


def test_ddp_powersgd_and_sparsecoll_rows_train_the_same_model_in_one_run(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    result = runner.invoke(app, ["train", "--dataset", "digits", "--ranks", "2", "--epochs", "1", "--baselines",
                                 "ddp,powersgd1", "--algorithms", "dense,gtopk", "--densities", "0.01", "--hooks",
                                 "gtopk", "--json", str(out)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    ddp, powersgd, dense, gtopk, hook = rows = document["rows"]
    assert [row["run"] for row in rows] == ["DDP", "PowerSGD r1", "opt dense", "opt gtopk", "hook gtopk"]
    steps = 1437 // (32 * 2)  # digits' training split over 2 ranks of 32
    for row in rows:
        assert row["steps"] == steps and not row["cut"] and row["wire_bytes_per_step"] is None  # loopback
        assert [point[0] for point in row["curve"]] == [5, 10, 15, 20, 22]  # 4 an epoch, and its end
        seconds = [point[1] for point in row["curve"]]
        assert seconds == sorted(seconds) and seconds[-1] == pytest.approx(row["training_seconds"])
        assert row["accuracy"] == row["curve"][-1][2] > 0.5 and row["compute_seconds_per_step"] > 0
    # DDP's allreduce and sparsecoll's dense optimizer take the same steps: the same curve
    assert [p[2] for p in ddp["curve"]] == pytest.approx([p[2] for p in dense["curve"]], abs=0.011)
    parameters = ddp["parameters"]
    assert ddp["steady_bytes_per_step"] == 4 * parameters and ddp["compression"] == 1.0  # 2(P-1)/P of it
    assert powersgd["start_powerSGD_iter"] == 2 and powersgd["compression"] > 2
    assert hook["steady_bytes_per_step"] < 0.6 * ddp["steady_bytes_per_step"] and hook["compression"] > 1.6
    assert gtopk["memory_beta_used"] == hook["memory_beta_used"] == 1.0
    assert hook["sparse_sgd_steps"] == hook["steps"]  # every step SGD at the k indices, not a dense step()
    assert hook["one_bucket"] is True  # as PerBucketDensityWarning advises, where accuracy is measured
    # the target is DDP's final accuracy less half a point; DDP reaches it, at its own curve's time
    assert document["target_accuracy"] == pytest.approx(ddp["accuracy"] - 0.005)
    assert ddp["time_to_target"] == next(s for _, s, a in ddp["curve"] if a >= ddp["accuracy"] - 0.005 - 1e-9)
    assert ddp["tta_vs_ddp"] == 1.0
    assert "to target" in result.output and "PowerSGD r1" in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80, result.output


@pytest.fixture(scope="module")
def group_of_one():
    from torch.distributed import FileStore

    from sparsecoll.torch import init_group

    with tempfile.TemporaryDirectory() as scratch:
        with init_group(store=FileStore(str(Path(scratch) / "store"), 1), rank=0, world_size=1, timeout=60,
                        kernel_threads=1) as sync:
            yield sync


def test_a_configuration_past_the_cap_stops_at_the_next_check_and_says_cut(group_of_one) -> None:
    data = load_dataset("digits")
    plan = Plan(epochs=3, batch=64, evals_per_epoch=2, cap_seconds=0.0, compute_steps=2)
    row = train_configuration(group_of_one, data, {"algorithm": "dense", "density": 1.0}, plan, WireCounter(None))
    every = (1437 // 64) // 2
    assert row["cut"] and row["steps"] == every and row["epochs_run"] == 1 and len(row["curve"]) == 1
    stages: list[str] = []  # what the stall watchdog hears: the warm-up, every step, every evaluation
    uncapped = train_configuration(group_of_one, data, {"algorithm": "dense", "density": 1.0},
                                   Plan(epochs=1, batch=64, evals_per_epoch=2, compute_steps=2), WireCounter(None),
                                   stages.append)
    assert not uncapped["cut"] and uncapped["steps"] == 1437 // 64 and len(uncapped["curve"]) == 2
    steps = [f"step {n}" for n in range(1, 1437 // 64 + 1)]
    assert stages == ["the warm-up step", *steps[:11], "the evaluation after step 11", *steps[11:],
                      "the evaluation after step 22"]


def test_the_25m_mlp_takes_timed_steps_on_random_data_and_reports_no_accuracy(group_of_one) -> None:
    plan = Plan(model="mlp25m", steps=2, warmup=1, compute_steps=2)
    stages: list[str] = []
    row = train_configuration(group_of_one, None, {"algorithm": "dense", "density": 1.0}, plan, WireCounter(None),
                              stages.append)
    assert stages == ["the warm-up step", "step 1", "step 2", "step 3"]  # the untimed one too
    assert row["parameters"] == 5000 * 5000 + 5000 + 5000 * 10 + 10
    assert row["accuracy"] is None and row["steps"] == 2 and not row["cut"] and "curve" not in row
    assert row["seconds_per_step"] > 0 and row["compute_seconds_per_step"] > 0
