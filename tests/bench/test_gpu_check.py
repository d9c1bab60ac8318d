"""tools/gpu_check.sh: its dry run end to end (the script's own plumbing: arguments, steps in
their processes, the table, the JSON and markdown reports), and the parts a dry run cannot reach:
a step's timeout, a crashed step, the budget, the verdicts on results only a GPU produces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsecoll.bench import gpu_check
from sparsecoll.bench.gpu_check import DRY, FAIL, OK, SKIP, TIMEOUT, Row, Step
from sparsecoll.bench.gpu_check_kernels import selection_row
from sparsecoll.bench.gpu_check_ranks import rows_from as ucx_rows_from
from sparsecoll.bench.gpu_check_train import rows_from
from sparsecoll.bench.host_copy_audit import DEVICE_TO_HOST, HOST_TO_DEVICE, HostCopyAudit
from tests.conftest import ucx_required, ucx_unavailable

ROOT = Path(__file__).resolve().parents[2]
SLEEPER = "tests.bench.gpu_check_sleeper"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict, str]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run([str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", "--jobs", "5", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=240)
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else {}
    markdown = (out / "gpu_check.md").read_text() if (out / "gpu_check.md").exists() else ""
    steps_log = (out / "gpu_check_steps.log").read_text() if (out / "gpu_check_steps.log").exists() else ""
    return proc, report, markdown, steps_log


def by_check(report: dict) -> dict[str, dict]:
    return {row["check"]: row for row in report["rows"]}


def test_dry_run_skips_every_device_row_and_passes_the_rest(dry_run) -> None:
    proc, report, markdown, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert report["dry_run"] is True
    rows = by_check(report)
    assert [step.name for step in gpu_check.STEPS] == list(dict.fromkeys(row["step"] for row in report["rows"]))
    assert all(row["metrics"]["step_seconds"] > 0 for row in report["rows"] if row["status"] != DRY)
    for device_row in ("cupy", "pytest -m gpu", "top-k 25M", "top-k 100M", "quantize/sketch 25M", "p2p device 256 MiB",
                       "CUDA model, 2 ranks on one GPU"):
        assert rows[device_row]["status"] == DRY, rows[device_row]
    ran = [row for row in report["rows"] if row["status"] != DRY]
    if ucx_unavailable() and not ucx_required():
        ran = [row for row in ran if row["step"] not in ("ucx", "train") and row["check"] != "ucxx"]
    assert all(row["status"] == OK for row in ran), ran
    assert {"python", "torch", "numba.cuda", "numpy"} <= set(rows)
    assert rows["top-k 1.02K 1%"]["metrics"]["correct"] is True
    assert rows["quantize 8-bit 1.02K"]["metrics"]["correct"] is True
    assert {"p2p-host 4MiB", "ring allreduce 256KiB float32", "gTop-k 65.5K x 0.1%"} <= set(rows)
    training = [row for row in ran if row["step"] == "train"]
    assert len(training) == 2 and all("replicas identical" in row["note"] for row in training), training
    assert all(row["metrics"]["rank0"]["digest"] == row["metrics"]["rank1_digest"] for row in training)


def test_dry_run_prints_the_table_and_writes_every_row_and_every_step_output(dry_run) -> None:
    proc, report, markdown, steps_log = dry_run
    assert "GPU check (dry run)" in proc.stdout
    assert markdown.count("\n| ") == len(report["rows"]) + 1  # the header and one line a row
    for row in report["rows"]:
        assert f"| {row['step']} | {row['check']} | {row['status']} |" in markdown
    for step in gpu_check.STEPS[:-1]:  # every step with a process: its whole output, its rows in it
        assert f"===== {step.name}\n" in steps_log
    assert steps_log.count(gpu_check.ROW_PREFIX) == sum(row["step"] != "gpu-tests" for row in report["rows"])


def test_a_step_past_its_timeout_is_killed_with_its_children_and_keeps_its_rows() -> None:
    started = time.monotonic()
    rows = gpu_check.run_step(Step("sleep", SLEEPER, 3.0), dry_run=True, timeout_s=3.0)
    assert time.monotonic() - started < 30
    assert [(row.check, row.status) for row in rows] == [("first", OK), ("step", TIMEOUT)], rows
    child = int(rows[-1].note.split("child ")[1].split()[0])
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_a_crashed_step_fails_with_its_output_and_the_exit_status_says_so(capsys) -> None:
    rows = gpu_check.run_step(Step("crash", SLEEPER, 60.0), dry_run=True, timeout_s=60.0)
    assert [(row.check, row.status) for row in rows] == [("first", OK), ("step", FAIL)], rows
    assert "exit status 3" in rows[-1].note and "the step broke here" in rows[-1].note


def test_a_spent_budget_skips_the_remaining_steps() -> None:
    rows = gpu_check.run_all([Step("sleep", SLEEPER, 60.0)], dry_run=True, budget_s=1.0)
    assert [(row.step, row.status) for row in rows] == [("sleep", SKIP)]
    assert "budget" in rows[0].note


def test_bad_arguments_are_refused(capsys) -> None:
    for argv in (["--budget", "0"], ["--steps", "nonsense"], ["--jobs", "2"], ["--dry-run", "--jobs", "0"]):
        with pytest.raises(SystemExit) as raised:
            gpu_check.main(argv)
        assert raised.value.code == 2


def trained(digest: str, large: int = 0, library: dict | None = None) -> dict:
    tally = {"count": {DEVICE_TO_HOST: 4, HOST_TO_DEVICE: 4}, "bytes": {DEVICE_TO_HOST: 64, HOST_TO_DEVICE: 64},
             "large": {DEVICE_TO_HOST: large, HOST_TO_DEVICE: 0}, "largest": 4000 if large else 16}
    return {"parameters": 1000, "steps": 20, "step_ms": 5.0, "losses": [2.3, 2.1], "digest": digest,
            "audit": tally, "large_bytes": 400, "library": library}


@pytest.mark.parametrize("second_digest, large, library, status", [
    ("same", 0, None, OK), ("other", 0, None, FAIL), ("same", 1, None, FAIL),
    ("same", 0, {"count": 3, "bytes": 30, "largest": 10}, OK),
    ("same", 0, {"count": 3, "bytes": 4000, "largest": 4000}, FAIL)])
def test_training_rows_fail_on_differing_replicas_or_a_d_sized_copy(second_digest, large, library, status) -> None:
    first = {mode: trained("same", large, library) for mode in ("optimizer", "ddp-hook")}
    second = {mode: trained(second_digest, large, library) for mode in ("optimizer", "ddp-hook")}
    rows = rows_from([first, second], dry_run=False)
    assert [row.status for row in rows] == [status, status], rows


def test_the_copy_audit_counts_moves_between_devices_by_size_and_restores_torch() -> None:
    original = torch.Tensor.to
    with HostCopyAudit(large_bytes=4000) as audit:
        torch.ones(1000).to("meta")           # 4000 bytes to another device: d-sized
        torch.ones(10).to("meta")             # small
        torch.ones(1000).to(torch.float64)    # same device: not a copy between devices
    assert torch.Tensor.to is original
    assert audit.tally.count[HOST_TO_DEVICE] == 2 and audit.tally.large[HOST_TO_DEVICE] == 1, audit.tally
    assert audit.tally.bytes[HOST_TO_DEVICE] == 4040 and audit.tally.count[DEVICE_TO_HOST] == 0


@pytest.mark.parametrize("size, density, fast_ms, correct, status", [
    (25_000_000, 0.001, 0.10, True, OK), (25_000_000, 0.001, 0.30, True, gpu_check.MISS),
    (25_000_000, 0.001, 0.10, False, FAIL), (100_000_000, 0.001, 0.30, True, OK)])
def test_selection_rows_judge_correctness_and_the_floor_target(size, density, fast_ms, correct, status) -> None:
    measured = {"size": size, "density": density, "k": int(size * density), "fast_ms": fast_ms, "exact_ms": 1.0,
                "torch_topk_ms": 0.65, "fast_vs_torch": 0.65 / fast_ms, "correct": correct}
    row = selection_row(measured, floor_ms=0.1, dry_run=False)
    assert row.status == status, row
    assert row.metrics["fast_vs_floor"] == pytest.approx(fast_ms / 0.1)


@pytest.mark.parametrize("device_gbps, correct, status", [(500.0, True, OK), (50.0, True, gpu_check.MISS),
                                                          (500.0, False, FAIL)])
def test_ucx_rows_judge_the_device_bandwidth_against_staging_and_the_target(device_gbps, correct, status) -> None:
    results = {"p2p-device": {"gbps": device_gbps, "seconds": 0.001, "correct": correct},
               "p2p-staged": {"gbps": 0.5, "seconds": 1.0, "correct": True},
               "gtopk": {"error": "InvalidArgumentError: cupy refused", "where": ["np.ascontiguousarray"]}}
    rows = {row.check: row for row in ucx_rows_from(results, dry_run=False, tls="cuda_ipc,cuda_copy,tcp")}
    assert rows["p2p device 256 MiB"].status == status and "staged through host 0.5 GB/s" in \
        rows["p2p device 256 MiB"].baseline
    assert rows["gtopk"].status == FAIL and "cupy refused" in rows["gtopk"].note
