"""``sparsecoll-bench train --density-schedule/--lr-scale/--momentum-masking``: the convergence levers from the
command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsecoll.bench import train
from sparsecoll.bench.cli import app
from sparsecoll.torch.density import Accordion

runner = CliRunner()


@pytest.mark.parametrize(("option", "value"), [("--density-schedule", "bogus"), ("--density-schedule", ""),
                                               ("--lr-scale", "0"), ("--lr-scale", "-1"), ("--lr-scale", "x"),
                                               ("--lr-scale", "inf"), ("--momentum-masking", "maybe"),
                                               ("--warmup-epochs", "-1"), ("--warmup-wire", "fp8"),
                                               ("--quantize-bits", "3"), ("--quantize-bits", "16")])
def test_a_bad_lever_is_refused_before_any_rank_starts(option: str, value: str) -> None:
    result = runner.invoke(app, ["train", "--dataset", "digits", option, value])
    output = result.output.strip()
    assert result.exit_code == 2 and output.startswith("error:") and option in output, output
    assert "\n" not in output and "starting" not in output, output


def test_configurations_take_each_schedule_and_scale_and_dense_runs_once_plain() -> None:
    configs = train.parse_configs("dense,gtopk", "0.001", schedules=["fixed", "accordion"], lr_scales=[1.0, 2.0])
    assert configs == [{"algorithm": "dense", "density": 1.0},
                       {"algorithm": "gtopk", "density": 0.001},
                       {"algorithm": "gtopk", "density": 0.001, "lr_scale": 2.0},
                       {"algorithm": "gtopk", "density": 0.001, "density_schedule": "accordion"},
                       {"algorithm": "gtopk", "density": 0.001, "density_schedule": "accordion", "lr_scale": 2.0}]
    assert train.parse_configs("dense,gtopk", "0.001", maskings=[False, True]) == [
        {"algorithm": "dense", "density": 1.0}, {"algorithm": "gtopk", "density": 0.001},
        {"algorithm": "gtopk", "density": 0.001, "momentum_masking": True}]
    levers = train.parse_configs("dense,gtopk", "0.001", schedules=["fixed", "accordion"], lr_scales=[1.0, 1.5],
                                 maskings=[False, True], dense_fp16s=[False, True])
    labels = [train.run_label(config) for config in levers]
    assert len(set(labels)) == len(labels) == 1 + 2 ** 4, labels  # every lever's row named apart
    assert labels[0] == "opt dense" and "opt gtopk accordion lr x1.5 masked fp16-dense" in labels
    quantized = train.parse_configs("dense,allgather", "0.01,0.001", dense_fp16s=[True], quantize_bits=[None, 8])
    assert quantized == [{"algorithm": "dense", "density": 1.0},
                         {"algorithm": "allgather", "density": 0.01, "dense_fp16": True},
                         {"algorithm": "allgather", "density": 0.01, "dense_fp16": True, "quantize_bits": 8},
                         {"algorithm": "allgather", "density": 0.001, "dense_fp16": True},
                         {"algorithm": "allgather", "density": 0.001, "dense_fp16": True, "quantize_bits": 8}]
    assert train.run_label(quantized[2]) == "opt allgather fp16-dense q8"
    with pytest.raises(TypeError, match="unknown levers"):
        train.parse_configs("gtopk", "0.01", lr_scale=[2.0])


@pytest.mark.parametrize(("name", "density", "critical"), [("accordion", 0.001, 0.01), ("accordion", 0.2, 1.0),
                                                           ("accordion-dense", 0.01, 1.0)])
def test_schedules_decide_every_epoch(name: str, density: float, critical: float) -> None:
    schedule = train.density_schedule({"density": density, "density_schedule": name}, 31)
    assert isinstance(schedule, Accordion) and schedule.interval == 31
    assert (schedule.density, schedule.critical_density) == (density, critical)
    assert train.density_schedule({"density": density}, 31) == density


def test_accordion_reaches_every_rank_and_spends_dense_bytes_in_critical_epochs(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    result = runner.invoke(app, ["train", "--dataset", "digits", "--ranks", "2", "--epochs", "2", "--batch", "16",
                                 "--hidden", "32", "--algorithms", "dense,gtopk", "--densities", "0.01",
                                 "--density-schedule", "accordion-dense", "--momentum-masking", "on",
                                 "--quantize-bits", "8",
                                 "--baselines", "none", "--hooks", "none",
                                 "--json", str(out)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    dense, accordion = json.loads(out.read_text())["rows"]
    assert "density_schedule" not in dense and dense["critical_epochs"] == []
    assert (dense["momentum_masking_used"], accordion["momentum_masking_used"]) == (False, True)
    assert (dense["quantize_bits_used"], accordion["quantize_bits_used"]) == (None, 8)
    assert accordion["density_schedule"] == "accordion-dense" and accordion["critical_epochs"] == [0, 1]
    for epoch in accordion["critical_epochs"]:  # dense epochs send what the dense row sends
        assert accordion["epoch_bytes"][epoch] == pytest.approx(dense["epoch_bytes"][epoch], rel=0.01)


def test_the_jobs_deadline_grows_with_its_rows_and_their_cap() -> None:
    """A 21-row run capped at 10 minutes a row must not be cut at a flat 30 minutes."""
    assert train.job_deadline(21, 600.0) > 21 * 600.0
    assert train.job_deadline(1, 60.0) < train.job_deadline(2, 60.0) < train.job_deadline(2, 120.0)
