"""``sparsecoll-bench train`` refuses bad input in one line with exit status 2, leaving no
network namespace and no process behind: an unknown model, algorithm, baseline or hook, a link
the kernel cannot shape (tc refuses the rate: checked by really trying, as root), and --link
without root (a real unprivileged process: the CLI in a user namespace of its own, uid 65534)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsecoll.bench.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def assert_one_line_error(result_output: str, exit_code: int, needle: str) -> None:
    output = result_output.strip()
    assert exit_code == 2, output
    assert output.startswith("error:") and needle in output, output
    assert "\n" not in output and "Traceback" not in output and "starting" not in output, output


@pytest.mark.parametrize(("arguments", "needle"), [
    (["--model", "resnet50"], "--model: unknown 'resnet50'"),
    (["--algorithms", "gtopk,nope"], "unknown 'nope'"),
    (["--baselines", "ddp,powersgd0"], "--baselines: unknown 'powersgd0'"),
    (["--baselines", "horovod"], "--baselines: unknown 'horovod'"),
    (["--algorithms", "dense,gtopk", "--hooks", "cltk"], "--hooks: 'cltk' not in --algorithms"),
    (["--model", "cnn", "--dataset", "digits"], "--model cnn needs --dataset mnist"),
    (["--evals-per-epoch", "0"], "--evals-per-epoch"),
    (["--cap", "0"], "--cap"),
    (["--steps", "0"], "--steps"),
])
def test_a_bad_choice_is_refused_before_any_rank_starts(arguments: list[str], needle: str) -> None:
    result = runner.invoke(app, ["train", *arguments])
    assert_one_line_error(result.output, result.exit_code, needle)


def test_hooks_name_only_compressed_algorithms_of_the_run() -> None:
    from sparsecoll.bench.train import hook_configs
    from sparsecoll.errors import InvalidArgumentError

    optimizer = [{"algorithm": "dense", "density": 1.0}, {"algorithm": "gtopk", "density": 0.01}]
    assert hook_configs(optimizer, "all") == hook_configs(optimizer, "gtopk") == [
        {"algorithm": "gtopk", "density": 0.01, "method": "hook"}]
    assert hook_configs(optimizer, "none") == []
    for wrong in ("cltk", "dense", "gtopk,nope"):
        with pytest.raises(InvalidArgumentError, match="--hooks"):
            hook_configs(optimizer, wrong)


def namespaces(prefix: str) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith(prefix)]


def children() -> list[str]:
    return subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split()


@pytest.mark.skipif(os.geteuid() != 0, reason="shaping a link needs root")
@pytest.mark.parametrize("rate", ["0bit", "1bit"])
def test_a_link_the_kernel_cannot_shape_is_one_line_and_leaves_no_namespace(rate: str) -> None:
    prefix = f"sc{os.getpid() % 100000}-"  # EmulatedNetwork names this process's namespaces so
    before = children()
    result = runner.invoke(app, ["train", "--dataset", "digits", "--ranks", "2", "--epochs", "1", "--baselines",
                                 "ddp", "--algorithms", "dense", "--link", rate])
    assert_one_line_error(result.stderr, result.exit_code, f"--link {rate}: the kernel could not shape this link")
    assert "tbf" in result.stderr and "rate" in result.stderr, result.stderr  # what tc said, in that line
    assert namespaces(prefix) == []
    assert children() == before


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare")
def test_link_without_root_is_one_line_from_a_real_unprivileged_process() -> None:
    # a new user namespace without a mapping: uid 65534 and no capability on the host's network
    # (`ip netns add` fails there with EPERM), yet the files of this interpreter stay readable
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    done = subprocess.run(["unshare", "--user", sys.executable, "-m", "sparsecoll.bench.cli", "train", "--link",
                           "1gbit"], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert_one_line_error(done.stderr + done.stdout, done.returncode,
                          "--link 1gbit creates network namespaces and needs root")
