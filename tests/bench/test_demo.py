"""``sparsecoll-bench demo``: emulated links where the machine can shape them, loopback (with the
reason) where it cannot, a refusal in one line for an explicit ``--link`` it cannot give, and
nothing left behind (namespaces, processes) either way.

A kernel that cannot shape is a ``tc`` on PATH that answers as such a kernel does
("RTNETLINK answers: Operation not supported"): ``ip netns exec`` runs it for every tc step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from sparsecoll.bench.demo import PhaseBar, Where, choose_where, conclusion, link_words
from sparsecoll.bench.netem import shaping_problem
from sparsecoll.bench.table import speedup
from sparsecoll.errors import InvalidArgumentError

ROOT = Path(__file__).resolve().parents[2]
REFUSAL = "RTNETLINK answers: Operation not supported"
LINE = re.compile(r"^gTop-k at 0\.1% reduced a 2,000,000-element float32 gradient ([\d.,]+x (?:faster|slower)|same) "
                  r"than Gloo's allreduce and CLT-k ([\d.,]+x (?:faster|slower)|same) over 2 emulated 1 Gbit/s "
                  r"links \(same run\)\.$")


@pytest.fixture
def unshaping_tc(tmp_path: Path) -> Path:
    """A directory whose ``tc`` refuses every qdisc, as a kernel without tbf does."""
    directory = tmp_path / "no-tbf"
    directory.mkdir()
    tc = directory / "tc"
    tc.write_text(f"#!/bin/sh\necho '{REFUSAL}' >&2\nexit 2\n")
    tc.chmod(0o755)
    return directory


def bench(*args: str, path_first: Path | None = None, as_user: bool = False,
          timeout: float = 240) -> tuple[subprocess.CompletedProcess, int, str]:
    """Run sparsecoll-bench in a child (stdout and stderr are pipes, not terminals); returns the
    run, its pid (the prefix of the namespaces it would make) and a marker its ranks inherit."""
    marker = uuid.uuid4().hex
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])), COLUMNS="80",
               DEMO_TEST_MARKER=marker, PYTHONDONTWRITEBYTECODE="1")
    if path_first is not None:
        env["PATH"] = f"{path_first}{os.pathsep}{env['PATH']}"
    child = subprocess.Popen([*(not_root() if as_user else ()), sys.executable, "-m", "sparsecoll.bench.cli", *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    finally:
        child.kill()
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr), child.pid, marker


def assert_nothing_left(pid: int, marker: str) -> None:
    """No namespace named after the run (its links or its probe), no process it started."""
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not [name for name in namespaces.split() if name.startswith(f"sc{pid % 100000}")], namespaces
    left = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("DEMO_TEST_MARKER") == marker:
                left.append(process.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    assert not left, left


def not_root() -> list[str]:
    """A command prefix that runs a program without root: as root, a user namespace of its own,
    where it is uid 65534 with no privilege over the host's network (it still reads the files
    root owns, such as the interpreter); nothing when this process is not root."""
    return ["unshare", "--user"] if os.geteuid() == 0 else []


def can_shape() -> bool:
    return os.geteuid() == 0 and shaping_problem() is None


@pytest.mark.skipif(not can_shape(), reason="needs root and a kernel whose tc shapes veth links with tbf")
def test_the_demo_runs_on_emulated_links_where_the_machine_can_shape_and_states_the_ratio(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    run, pid, marker = bench("demo", "--ranks", "2", "--size", "2M", "--iters", "1", "--json", str(out))
    assert run.returncode == 0, run.stderr
    assert_nothing_left(pid, marker)
    document = json.loads(out.read_text())
    assert document["link"] == "1gbit" and document["command"] == "demo"
    rows = {row["algorithm"]: row for row in document["rows"]}
    assert list(rows) == ["dense", "gloo", "gtopk", "cltk"] and all(row["wrong"] == 0 for row in rows.values())
    # the links are shaped: 8 MB through a 1 Gbit/s link take at least 64 ms (tbf's burst lets ~6% through early)
    for name, sent in (("dense", rows["dense"]["bytes_sent"]), ("gloo", rows["gloo"]["formula_bytes"])):
        assert rows[name]["min_ms"] >= 0.8 * sent * 8 / 1e9 * 1e3, rows[name]
    sentence = run.stdout.rstrip().splitlines()[-1]
    stated = LINE.match(sentence)
    assert stated, sentence
    assert stated.groups() == (speedup(rows["gtopk"]["speedup_vs_gloo"]), speedup(rows["cltk"]["speedup_vs_gloo"]))
    assert document["conclusion"] == sentence
    # the bar, in a pipe: one plain line a phase, no cursor movement, ending in "done"
    phases = [line for line in run.stderr.splitlines() if re.match(r"^\[\d/6\]", line)]
    assert [line[:5] for line in phases] == [f"[{n}/6]" for n in range(7)], run.stderr
    assert phases[-1].endswith("done") and "\r" not in run.stderr and "\x1b" not in run.stderr, run.stderr


def test_a_kernel_that_cannot_shape_gets_loopback_and_the_reason(unshaping_tc: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the probe stops at root before it reaches tc")
    run, pid, marker = bench("demo", "--ranks", "1", "--size", "100K", "--iters", "1", path_first=unshaping_tc)
    assert run.returncode == 0, run.stderr
    assert_nothing_left(pid, marker)
    assert re.search(r"^running on loopback: this machine cannot build emulated links: `ip netns exec \S+ tc qdisc "
                     rf"add dev \S+ root tbf .*` answered '{REFUSAL}'$", run.stderr, re.M), run.stderr
    sentence = run.stdout.rstrip().splitlines()[-1]
    assert sentence.startswith("On loopback, gTop-k at 0.1% reduced a 100,000-element float32 gradient"), sentence
    assert "loopback has no bandwidth limit" in sentence and "sparse selection costs more" in sentence


@pytest.mark.parametrize("command", [["demo", "--link", "1gbit"], ["sparse", "--link", "1gbit", "-r", "2"],
                                     ["collectives", "--link", "1gbit", "-r", "2", "-e", "4K"]])
def test_an_explicit_link_the_kernel_cannot_shape_is_refused_in_one_line(unshaping_tc: Path,
                                                                         command: list[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("without root the refusal is about root (see the next test)")
    run, pid, marker = bench(*command, path_first=unshaping_tc, timeout=120)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert_nothing_left(pid, marker)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: this machine cannot build emulated links:"), run.stderr
    assert REFUSAL in lines[0] and "tbf" in lines[0], run.stderr


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("unshare") is None, reason="no unshare to drop root")
def test_without_root_the_demo_falls_back_and_an_explicit_link_is_refused() -> None:
    probe = subprocess.run([*not_root(), sys.executable, "-c", "import os; from sparsecoll.bench.demo import "
                            "choose_where; print(os.geteuid() != 0, choose_where(None))"],
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1"))
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == ("True Where(link=None, fallback='emulated links need root (network "
                                    "namespaces and tc)')"), probe.stdout
    for command in (["demo", "--link", "1gbit"], ["sparse", "--link", "1gbit"]):
        run, pid, marker = bench(*command, as_user=True, timeout=60)
        assert run.returncode == 2 and run.stderr.strip() == "error: --link 1gbit creates network namespaces and " \
                                                             "needs root", run.stderr
        assert_nothing_left(pid, marker)


def test_choose_where_obeys_an_explicit_request() -> None:
    assert choose_where("loopback") == Where(None)
    with pytest.raises(InvalidArgumentError, match="not like 1gbit"):
        choose_where("fast")
    if os.geteuid() == 0:
        assert choose_where("100mbit") == Where("100mbit")  # built (or refused) when the ranks start


def test_the_sentence_says_what_the_run_measured() -> None:
    rows = [{"algorithm": name, "d": 25_000_000, "ranks": 4, "speedup_vs_gloo": ratio}
            for name, ratio in (("dense", 0.9), ("gloo", 1.0), ("gtopk", 9.84), ("cltk", 0.5))]
    assert conclusion(rows, Where("1gbit")) == (
        "gTop-k at 0.1% reduced a ResNet-50-sized gradient (25M float32) 9.8x faster than Gloo's allreduce and "
        "CLT-k 2.0x slower over 4 emulated 1 Gbit/s links (same run).")
    loopback = conclusion(rows, Where(None, "not root"))
    assert loopback.startswith("On loopback, gTop-k at 0.1% reduced a ResNet-50-sized gradient (25M float32) 9.8x "
                               "faster than Gloo's allreduce and CLT-k 2.0x slower (same run); loopback has no "
                               "bandwidth limit"), loopback
    assert link_words("1gbit") == "1 Gbit/s" and link_words("100mbit,5ms") == "100 Mbit/s, 5ms one-way"
    assert link_words("10gbit") == "10 Gbit/s" and link_words("512kbit") == "512 kbit/s"


def test_the_bar_in_a_pipe_is_one_plain_line_a_phase(capsys: pytest.CaptureFixture) -> None:
    bar = PhaseBar(3)
    for phase in ("starting", "timing", "checking"):
        bar.next(phase)
    bar.close()
    bar.close()  # idempotent: the last line is written once
    lines = capsys.readouterr().err.splitlines()
    assert [re.sub(r"\s+[\d.]+s\s+", " ", line) for line in lines] == [
        "[0/3] starting", "[1/3] timing", "[2/3] checking", "[3/3] done"], lines


def test_the_ranks_are_let_go_when_the_parents_compilation_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from sparsecoll import kernels
    from sparsecoll.bench.demo import compile_kernels

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "topk", broken)
    compiled = threading.Event()
    with pytest.raises(RuntimeError, match="no compiler"):
        compile_kernels(compiled)
    assert compiled.is_set()  # ranks waiting on it go on (and compile, or fail, themselves)
