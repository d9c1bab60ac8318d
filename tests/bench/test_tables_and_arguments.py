"""sparsecoll-bench's output fits an 80-column terminal without cutting a number, and every bad
argument is refused in one line, with a non-zero exit, before any rank starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from sparsecoll.bench import collectives, kernels, soak, sparse, train
from sparsecoll.bench.table import count, nbytes, percent, render, seconds, speedup
from sparsecoll.collectives.cost_model import DEFAULT_MODEL, auto_gap

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures"


def rows_of(name: str) -> list[dict]:
    return json.loads((FIXTURES / f"{name}.json").read_text())["rows"]


def soak_rows() -> list[dict]:
    return [{"rank": rank, "iterations": 10_000, "errors": 0, "rss_before_mib": 181.25, "rss_after_mib": 181.5,
             "rss_growth_pct": 0.14, "fds_before": 17, "fds_after": 17, "calls_per_s": 2931.7} for rank in range(4)]


def demo_rows() -> list[dict]:
    """A sweep's rows at its widest: sizes, algorithms, densities and bits that vary, slow ratios."""
    return [{"size": size, "count": size // 4, "op": "allreduce", "algorithm": algorithm, "density": density,
             "k": 41, "bits": bits, "time_us": 13_573.2, "min_us": 9_831.0, "algbw": 0.309, "busbw": 0.00464,
             "bytes_sent": 6_291_840, "wrong": 0, "gloo_time_us": 9154.1, "gloo_busbw": 0.687, "ratio": ratio}
            for size in (4 << 10, 256 << 10, 256 << 20) for algorithm, density, bits, ratio in
            (("dense", None, None, 1.03), ("allgather", 0.001, 8, 0.674), ("gtopk", 0.01, None, 12.5))]


TABLES = {
    "collectives": lambda console, wide: render("collectives", collectives.TABLE,
                                                collectives.table_rows(rows_of("collectives-loopback")), console,
                                                wide=wide),
    "collectives-sparse-quantized": lambda console, wide: render(
        "sparsecoll collectives: 4 ranks, TCP, loopback", collectives.TABLE,
        collectives.table_rows(demo_rows()), console, wide=wide),
    "sparse": lambda console, wide: render("sparse", sparse.TABLE, rows_of("sparse-1gbit"), console, wide=wide),
    "auto": lambda console, wide: render("auto", sparse.AUTO_TABLE, auto_gap(rows_of("sparse-1gbit"), DEFAULT_MODEL),
                                         console, wide=wide),
    "auto-one-row": lambda console, wide: render("algorithm='auto' against the fastest measured (no calibration "
                                                 "file: calibrated online)", sparse.AUTO_TABLE,
                                                 auto_gap(rows_of("sparse-1gbit"), DEFAULT_MODEL)[:1], console,
                                                 wide=wide),
    "kernels": lambda console, wide: kernels.print_table(rows_of("kernels"), console, wide=wide),
    "train": lambda console, wide: render("train", train.TABLE, rows_of("train-digits"), console, wide=wide),
    "soak": lambda console, wide: render("soak", soak.TABLE, soak_rows(), console, wide=wide),
}


def rendered(name: str, width: int, wide: bool) -> str:
    console = Console(width=width, record=True, file=open(os.devnull, "w"), color_system=None)
    TABLES[name](console, wide)
    return console.export_text()


@pytest.mark.parametrize("name", sorted(TABLES))
def test_default_tables_fit_80_columns_and_cut_nothing(name: str) -> None:
    text = rendered(name, 80, wide=False)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    assert "…" not in text and "..." not in text, text
    body = [line for line in lines if line.strip() and not set(line.strip()) <= set("─━ ")]
    wide = rendered(name, 400, wide=True)
    assert len(body) <= len(wide.splitlines()) + 4, f"rows wrapped to fit:\n{text}"  # no folded cells
    assert max(len(line) for line in wide.splitlines()) > max(len(line) for line in lines) or name == "soak"


def test_units_percentages_and_ratios_read_as_words() -> None:
    assert [count(25_000_000), count(1049), count(1000), count(7)] == ["25M", "1.05K", "1K", "7"]
    assert [nbytes(1_573_248), nbytes(600), nbytes(402_665_472)] == ["1.57MB", "600B", "403MB"]
    assert [percent(0.001), percent(0.01), percent(1.0)] == ["0.1%", "1%", "100%"]
    assert [seconds(0.0135), seconds(876e-6), seconds(1.32)] == ["13.5ms", "876us", "1.32s"]
    assert [speedup(1.94), speedup(1 / 1.1), speedup(0.953), speedup(42.4), speedup(1.0)] == \
        ["1.9x faster", "1.1x slower", "1.05x slower", "42x faster", "same"]


def test_collectives_table_shows_density_as_percent_and_ratio_in_words() -> None:
    text = rendered("collectives", 80, wide=False)
    assert "x faster" in text or "x slower" in text
    train_text = rendered("train", 80, wide=False)
    assert "100%" in train_text and " 1% " in train_text and "0.01 " not in train_text, train_text


BAD_ARGUMENTS = [
    (["sparse", "--density", "-0.1"], "--density"),
    (["sparse", "--density", "1.5"], "--density"),
    (["collectives", "--quantize-bits", "3"], "--quantize-bits"),
    (["collectives", "--density", "0"], "--density"),
    (["sparse", "--algorithms", "foo"], "unknown 'foo'"),
    (["collectives", "--algorithms", "dense,nope"], "unknown 'nope'"),
    (["collectives", "--ops", "reduce"], "--ops"),
    (["collectives", "-r", "0"], "--ranks"),
    (["sparse", "-r", "0"], "--ranks"),
    (["sparse", "-r", "2,-1"], "--ranks"),
    (["sparse", "--iters", "0"], "--iters"),
    (["sparse", "-d", "lots"], "not a count"),
    (["collectives", "-b", "8K", "-e", "1K"], "--maxbytes"),
    (["collectives", "-f", "1"], "--stepfactor"),
    (["collectives", "--warmup_iters", "-1"], "--warmup-iters"),
    (["collectives", "--backend", "carrier-pigeon"], "--backend"),
    (["demo", "-r", "0"], "--ranks"),
    (["soak", "--iters", "0"], "--iters"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--dataset", "cifar"], "--dataset"),
    (["train", "--algorithms", "gtopk,foo"], "unknown 'foo'"),
    (["kernels", "--sizes", "0"], "--sizes"),
    (["kernels", "--densities", "2"], "--densities"),
    (["calibrate", "-r", "1"], "--ranks"),
    (["sparse", "--algorithms", "gtopk", "--import", "no_such_module_here"], "--import no_such_module_here"),
]


def bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(COLUMNS="80", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "sparsecoll.bench.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_bad_arguments_are_refused_in_one_line_before_any_rank_starts() -> None:
    """One interpreter checks the whole matrix (a subprocess per case would cost an import each);
    the last case runs as a real command line below."""
    from typer.testing import CliRunner

    from sparsecoll.bench.cli import app

    runner = CliRunner()
    for args, expected in BAD_ARGUMENTS:
        result = runner.invoke(app, args)
        output = result.output.strip()
        assert result.exit_code == 2, (args, output)
        assert expected in output and output.startswith("error:"), (args, output)
        assert "\n" not in output and "Traceback" not in output, (args, output)
        assert "starting" not in output, (args, output)  # no rank was spawned


def test_a_bad_argument_exits_before_spawning_from_the_real_command_line() -> None:
    result = bench("sparse", "--import", "no_such_module_here", "--algorithms", "foo", "--density", "-1")
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: --import"), result.stderr


def test_import_after_the_subcommand_registers_names_version_and_help(tmp_path: Path) -> None:
    (tmp_path / "my_codec_plugin.py").write_text(
        "import numpy as np, sparsecoll\n"
        "@sparsecoll.register_compressor('halves')\n"
        "class Halves:\n"
        "    def encode(self, array): return (array / 2).astype(np.float32)\n"
        "    def decode(self, payload): return payload * 2\n")
    env_path = os.pathsep.join([str(tmp_path), str(ROOT)])
    common = dict(capture_output=True, text=True, timeout=60, cwd=ROOT,
                  env=dict(os.environ, PYTHONPATH=env_path, COLUMNS="80"))
    # a registered name passes validation only when the module was imported; -r 0 then stops it before spawning
    after = subprocess.run([sys.executable, "-m", "sparsecoll.bench.cli", "sparse", "--algorithms", "halves",
                            "--import", "my_codec_plugin", "-r", "0"], **common)
    assert after.returncode == 2 and "--ranks" in after.stderr, after.stderr
    version = subprocess.run([sys.executable, "-m", "sparsecoll.bench.cli", "--version"], **common)
    assert version.returncode == 0 and version.stdout.startswith("sparsecoll-bench (sparsecoll) 0."), version.stdout
    from typer.testing import CliRunner

    from sparsecoll.bench.cli import app

    for command in ("demo", "collectives", "soak", "sparse", "kernels", "train", "calibrate"):
        text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"}).output
        assert "<" not in text and "--json" in text and "--import" in text, (command, text)
        assert max(len(line) for line in text.splitlines()) <= 80, (command, text)


def test_every_option_of_every_subcommand_has_help() -> None:
    import typer

    from sparsecoll.bench.cli import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for parameter in command.params:
            if not getattr(parameter, "hidden", False):
                assert getattr(parameter, "help", None), f"{name} {parameter.opts} has no help"


def test_a_rank_error_is_printed_with_its_rank_not_eaten_as_markup(capsys: pytest.CaptureFixture) -> None:
    import typer

    from sparsecoll.bench import cli_support
    from sparsecoll.errors import PeerLostError

    with pytest.raises(typer.Exit) as stopped:
        with cli_support.clean_errors():
            raise PeerLostError("connection reset", rank=0, peer=1)
    assert stopped.value.exit_code == 2
    assert capsys.readouterr().err.strip() == "error: [rank 0, peer 1] connection reset"
