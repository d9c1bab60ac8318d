"""The GPU check: one call on a lent GPU machine, one summary table (``tools/gpu_check.sh``).

Five steps after a ``setup`` row group (versions, devices, what imports), each in its own
process with its own timeout (a hang costs that step, never the run), inside an overall budget so
the whole call holds its 8 minutes:

1. ``topk``: our CUDA top-k against ``torch.topk`` and against a read floor measured here;
2. ``quantize-sketch``: CUDA quantize, dequantize and count-sketch throughput, checked against
   the CPU kernels;
3. ``ucx``: two ranks on one GPU over UCX: device buffers point to point against staging through
   host, a ring allreduce and a gTop-k on device arrays, checked against numpy;
4. ``train``: two ranks train a CUDA model with SparseCollOptimizer and with the DDP hook
   (gtopk, 0.1%): replicas identical, d-sized host copies counted, against plain SGD's step;
5. ``gpu-tests``: the tests marked ``gpu`` with Numba's CUDA simulator off.

``--dry-run`` runs on a machine without a GPU: kernels under the simulator at small sizes,
ranks over UCX on loopback TCP with host arrays, and every device-only row says
"skipped (dry run)". A step prints its rows as ``ROW_PREFIX`` + JSON lines as it goes, so a
step that times out keeps the rows it finished. The exit status is 1 when a row FAILed or a
step timed out, else 0 (a missed speed target is ``MISS``, which is reported, not failed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROW_PREFIX = "GPU-CHECK-ROW "
OK, FAIL, MISS, SKIP, DRY, TIMEOUT = "ok", "FAIL", "MISS", "SKIP", "skipped (dry run)", "TIMEOUT"
FAILING = (FAIL, TIMEOUT)
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUDGET_S = 450.0
"""What the steps may take together: 8 minutes less the set-up and a margin."""
LOOPBACK_UCX = {"UCX_NET_DEVICES": "lo", "UCX_WARN_UNUSED_ENV_VARS": "n"}
DEVICE_UCX_TLS = "cuda_ipc,cuda_copy,tcp"


@dataclass
class Row:
    """One line of the summary: what was checked, how it went, what it measured against what."""

    step: str
    check: str
    status: str
    value: str = ""
    baseline: str = ""
    note: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """A step: the module whose ``main`` runs it, its timeout, and the environment it needs."""

    name: str
    module: str | None
    timeout_s: float
    simulator_in_dry_run: bool = False
    ucx: bool = False


STEPS = (
    Step("setup", "sparsecoll.bench.gpu_check_setup", 60.0, simulator_in_dry_run=True),
    Step("topk", "sparsecoll.bench.gpu_check_kernels", 100.0, simulator_in_dry_run=True),
    Step("quantize-sketch", "sparsecoll.bench.gpu_check_kernels", 90.0, simulator_in_dry_run=True),
    Step("ucx", "sparsecoll.bench.gpu_check_ranks", 90.0, ucx=True),
    Step("train", "sparsecoll.bench.gpu_check_train", 120.0, ucx=True),
    Step("gpu-tests", None, 240.0),
)
"""In the order they run: the measurements the issue asks for first, then the tests, which
take what is left of the budget (compiling every CUDA kernel case is the long part)."""


def emit(row: Row) -> None:
    """Print ``row`` for the parent (called in a step's process)."""
    print(ROW_PREFIX + json.dumps(row.__dict__, default=float), flush=True)


def step_main(argv: Sequence[str] | None, steps: dict[str, Callable[[bool], None]], description: str) -> None:
    """A step module's command line: ``STEP [--dry-run]`` runs ``steps[STEP](dry_run)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("step", choices=sorted(steps))
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    steps[args.step](args.dry_run)


def step_environment(step: Step, dry_run: bool) -> dict[str, str]:
    """The step's environment: the simulator on or off, UCX over loopback (TCP alone in a
    dry run, CUDA IPC and copies first on a GPU), and this tree first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env["NUMBA_ENABLE_CUDASIM"] = "1" if dry_run and step.simulator_in_dry_run else "0"
    if step.ucx:
        env.update(LOOPBACK_UCX)
        env["UCX_TLS"] = "tcp" if dry_run else DEVICE_UCX_TLS
    return env


def run_step(step: Step, dry_run: bool, timeout_s: float, outputs: dict[str, str] | None = None) -> list[Row]:
    """Run one step in its own process session (killed whole at its timeout, ranks included);
    its whole output goes into ``outputs[step.name]`` when given (the table keeps only a tail)."""
    if step.module is None:
        return gpu_tests(dry_run, timeout_s, outputs)
    # imported by name, not run as __main__: spawned ranks must find their functions by module
    launcher = f"import sys; from {step.module} import main; main(sys.argv[1:])"
    command = [sys.executable, "-c", launcher, step.name, *(["--dry-run"] if dry_run else [])]
    env = dict(step_environment(step, dry_run), GPU_CHECK_STEP_TIMEOUT=str(timeout_s))
    output, code, timed_out = _run(command, env, timeout_s)
    if outputs is not None:
        outputs[step.name] = output
    rows = [Row(**json.loads(line[len(ROW_PREFIX):])) for line in output.splitlines()
            if line.startswith(ROW_PREFIX)]
    if timed_out:
        rows.append(Row(step.name, "step", TIMEOUT, note=f"killed after {timeout_s:.0f} s; "
                        f"last output: {_tail(output)}"))
    elif code != 0:
        rows.append(Row(step.name, "step", FAIL, note=f"exit status {code}: {_tail(output)}"))
    elif not rows:
        rows.append(Row(step.name, "step", FAIL, note=f"no rows: {_tail(output)}"))
    return rows


def gpu_tests(dry_run: bool, timeout_s: float, outputs: dict[str, str] | None = None) -> list[Row]:
    """Every test marked ``gpu`` (found by its marker), with the CUDA simulator off."""
    if dry_run:
        return [Row("gpu-tests", "pytest -m gpu", DRY)]
    files = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").rglob("test_*.py")
                   if "mark.gpu" in path.read_text())
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider", *files]
    output, code, timed_out = _run(command, step_environment(Step("gpu-tests", None, timeout_s), False), timeout_s)
    if outputs is not None:
        outputs["gpu-tests"] = output
    summary = _pytest_summary(output)
    skipped = [line for line in output.splitlines() if line.startswith("SKIPPED")]
    if timed_out:
        return [Row("gpu-tests", "pytest -m gpu", TIMEOUT, summary, note=_tail(output))]
    passed = re.search(r"(\d+) passed", summary)
    status = OK if code == 0 and passed and not skipped else FAIL if code != 0 or not passed else SKIP
    note = "; ".join(skipped)[:600] if status == SKIP else "" if status == OK else _tail(output)
    return [Row("gpu-tests", "pytest -m gpu", status, summary, note=note, metrics={"files": files})]


def run_all(steps: Sequence[Step], dry_run: bool, budget_s: float, jobs: int = 1,
            outputs: dict[str, str] | None = None) -> list[Row]:
    """Each step under ``min(its timeout, what is left of the budget)``; in turn, or ``jobs`` at a
    time (for a dry run, whose timings mean nothing: the steps then share the cores). Each
    step's whole output goes into ``outputs`` when given."""
    deadline = time.monotonic() + budget_s
    printed = threading.Lock()
    header = [True]

    def one(step: Step) -> list[Row]:
        left = deadline - time.monotonic()
        if left < 5:
            step_rows = [Row(step.name, "step", SKIP, note="the run's budget is spent")]
        else:
            started = time.monotonic()
            step_rows = run_step(step, dry_run, min(step.timeout_s, left), outputs)
            for row in step_rows:
                row.metrics.setdefault("step_seconds", round(time.monotonic() - started, 2))
        with printed:
            print_rows(step_rows, header=header[0])
            header[0] = False
        return step_rows

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return [row for step_rows in pool.map(one, steps) for row in step_rows]


def _run(command: list[str], env: dict[str, str], timeout_s: float) -> tuple[str, int, bool]:
    """(stdout + stderr, exit status, timed out) of ``command`` in a new process session."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
        return output, process.returncode, False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return output, process.returncode, True


def _pytest_summary(output: str) -> str:
    lines = [line.strip("= ") for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    return lines[-1] if lines else "no summary"


def _tail(output: str, limit: int = 400) -> str:
    text = " | ".join(line for line in output.strip().splitlines()[-6:] if line.strip())
    return text[-limit:]


COLUMNS = ("step", "check", "status", "value", "baseline", "note")


def print_rows(rows: Sequence[Row], header: bool = True) -> None:
    """The rows as plain text lines, as they come (the full table is printed at the end)."""
    if header:
        print(" | ".join(COLUMNS), flush=True)
    for row in rows:
        print(" | ".join(str(getattr(row, column)) for column in COLUMNS), flush=True)


def markdown(rows: Sequence[Row], dry_run: bool) -> str:
    """The summary as a markdown table."""
    title = "GPU check (dry run: no GPU, CUDA simulator)" if dry_run else "GPU check"
    lines = [f"## {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [str(getattr(row, column)).replace("|", "/").replace("\n", " ") for column in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_table(rows: Sequence[Row], dry_run: bool) -> None:
    """The summary table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="GPU check (dry run)" if dry_run else "GPU check")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(getattr(row, column)) for column in COLUMNS))
    Console(width=160).print(table)


def write_reports(rows: Sequence[Row], out_dir: Path, dry_run: bool, outputs: dict[str, str] | None = None) -> None:
    """``gpu_check.json`` (every row with its raw metrics), ``gpu_check.md`` and, with
    ``outputs``, ``gpu_check_steps.log`` (every step's whole output) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {"dry_run": dry_run, "rows": [row.__dict__ for row in rows]}
    (out_dir / "gpu_check.json").write_text(json.dumps(document, indent=2, default=float))
    (out_dir / "gpu_check.md").write_text(markdown(rows, dry_run))
    if outputs is not None:
        (out_dir / "gpu_check_steps.log").write_text(
            "".join(f"===== {name}\n{text}\n" for name, text in outputs.items()))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry (``tools/gpu_check.sh`` passes its arguments here)."""
    names = [step.name for step in STEPS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="no GPU: simulator, host arrays, device rows skipped")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                        help="write gpu_check.json and gpu_check.md here (default: $OUT when set)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all steps together")
    parser.add_argument("--steps", nargs="+", choices=names, default=names, help="run only these steps")
    parser.add_argument("--jobs", type=int, default=1,
                        help="steps at a time (default 1: a GPU run's timings need the machine to themselves)")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    if args.jobs < 1 or (args.jobs > 1 and not args.dry_run):
        parser.error(f"--jobs must be 1, or more with --dry-run (timings on a GPU need one step at a time), got {args.jobs}")
    outputs: dict[str, str] = {}
    rows = run_all([step for step in STEPS if step.name in args.steps], args.dry_run, args.budget, args.jobs,
                   outputs)
    print_table(rows, args.dry_run)
    if args.out is not None:
        write_reports(rows, args.out, args.dry_run, outputs)
    return 1 if any(row.status in FAILING for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
