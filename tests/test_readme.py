"""Every Python block of the README runs verbatim on real ranks under torchrun, and its two
set-up commands install what the examples and sparsecoll-bench import."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
SETUP = re.findall(r'^    python -m venv \.venv .*pip install "torch==2\.13\.0" -e "\.\[([a-z,]*)\]"(.*)$', README, re.M)
"""(extras, rest of the line) of the README's two indented set-up commands, in order."""


def _distribution(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower()


def test_first_command_installs_what_examples_and_bench_need_and_leaves_ucx_out() -> None:
    (first_extras, first_rest), (test_extras, test_rest) = SETUP
    assert "sparsecoll-bench demo" in first_rest and "pytest" in test_rest
    first = {_distribution(req) for extra in first_extras.split(",") for req in EXTRAS[extra]}
    assert {"scikit-learn", "mlxtend"} <= first  # the training example and `sparsecoll-bench train`
    assert not any(name.startswith("ucxx") for name in first)  # ~250 MB a plain-Ethernet user skips
    tested = {_distribution(req) for extra in test_extras.split(",") for req in EXTRAS[extra]}
    assert first <= tested and any(name.startswith("ucxx") for name in tested)
    ci = subprocess.run(["sed", "-n", r's/^    \(python -m venv .venv .*pytest.*\)$/\1/p', "README.md"],
                        cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    assert ci and "[test,ucx]" in ci[0]  # .ci/run still finds the test command


RUN_IN_TURN = "import runpy, sys\nfor path in sys.argv[1:]:\n    runpy.run_path(path, run_name='__main__')\n"
"""Runs each block's file, unchanged, as __main__ in turn: one torchrun job (and one torch import
per rank) for several blocks; every block still makes its own group."""


def _torchrun(scripts: list[Path], ranks: int = 2) -> tuple[subprocess.CompletedProcess, str]:
    """Run the scripts in turn on ``ranks`` ranks; the run and every rank's stdout, joined (each
    rank's goes to its own file, so lines of two ranks cannot interleave)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    runner = scripts[0].parent / "run_in_turn.py"
    runner.write_text(RUN_IN_TURN)
    logs = scripts[0].parent / "logs"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                          str(ranks), "--redirects", "1", "--log-dir", str(logs), str(runner), *map(str, scripts)],
                         capture_output=True, text=True, timeout=240, env=env, cwd=scripts[0].parent)
    return run, "".join(path.read_text() for path in sorted(logs.rglob("stdout.log")))


EXPECTED_OUTPUT = [
    r"^(\d) \[[-0-9. e]+\] (\d+) bytes sent$",                      # asyncio allreduce
    r"^(\d) (\d+) bytes sent, 4194304 in the dense array$",          # the blocking calls
    r"^(\d) (\d+) bytes sent instead of 4194304$",                   # sparse and compressed
    r"^(\d) \(\([\d, ]+\),\) (\d+) of (\d+) bytes to other hosts$",      # two-level (one host here)
    r"^rank (\d): loss ([0-9.]+), (\d+) bytes sent last step, a dense allreduce sends ([0-9,]+)$",  # training
    (r"^server: (\d+) updates, (\d+) refused as too stale$",                                          # AsyLPG:
     r"^worker (\d): loss ([0-9.]+), (\d+) bytes pushed instead of (\d+)$"),                          # by role
]
HOSTS = 3
TRAINING = 4
PARAMETER_SERVER = 5


def test_the_readme_has_the_blocks_this_test_knows() -> None:
    assert len(BLOCKS) == len(EXPECTED_OUTPUT), "a README block was added or removed: list its output here"
    assert "SparseCollOptimizer" in BLOCKS[TRAINING]


def _matches(pattern: str, stdout: str) -> list[re.Match]:
    lines = [match for line in stdout.splitlines() if (match := re.match(pattern, line))]
    assert sorted(match.group(1) for match in lines) == ["0", "1"], (pattern, stdout)
    return lines


def test_readme_api_blocks_run_verbatim_on_two_ranks(tmp_path: Path) -> None:
    scripts = []
    for index in (*range(TRAINING), PARAMETER_SERVER):
        scripts.append(tmp_path / f"block{index}.py")
        scripts[-1].write_text(BLOCKS[index])
    run, stdout = _torchrun(scripts)
    assert run.returncode == 0, run.stderr[-3000:]
    _matches(EXPECTED_OUTPUT[0], stdout)
    for index in (1, 2):  # sparse: a small fraction of what the dense allreduce would send
        assert all(0 < int(match.group(2)) < 4194304 / 20 for match in _matches(EXPECTED_OUTPUT[index], stdout))
    for match in _matches(EXPECTED_OUTPUT[HOSTS], stdout):  # both ranks on this host: flat, nothing between hosts
        assert int(match.group(2)) == 0 < int(match.group(3)) < 4194304 / 20, match.group(0)
    server, worker = (re.search(pattern, stdout, re.M) for pattern in EXPECTED_OUTPUT[PARAMETER_SERVER])
    assert server and int(server.group(1)) == 200, stdout  # one worker's 200 pushes, all applied
    assert worker and float(worker.group(2)) < 1.0, stdout  # it learned through 8-bit parameters
    assert 0 < int(worker.group(3)) < int(worker.group(4)) / 6, stdout  # 4-bit pushes: ~1/8 of fp32


def test_readme_training_example_runs_verbatim_and_reports_dense_bytes(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(BLOCKS[TRAINING])
    run, stdout = _torchrun([script])
    assert run.returncode == 0, run.stderr[-3000:]
    for match in _matches(EXPECTED_OUTPUT[TRAINING], stdout):
        sent, dense = int(match.group(3)), int(match.group(4).replace(",", ""))
        assert float(match.group(2)) < 0.5 and 0 < sent < dense / 10, match.group(0)
