"""The report tools on small saved runs: plots for every benchmark kind, and a README section
rewritten between its markers and nowhere else."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparsecoll.bench.plots import plot_document
from sparsecoll.errors import InvalidArgumentError

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures"
KINDS = {"collectives-loopback": "collectives", "sparse-1gbit": "sparse", "kernels": "kernels",
         "train-digits": "train"}
README = """# project

Intro that must survive.

## Benchmarks

<!-- bench:begin -->
stale numbers
<!-- bench:end -->

## After
Text after the section.
"""


def tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)


def test_every_fixture_is_a_benchmark_of_its_kind() -> None:
    for name, kind in KINDS.items():
        document = json.loads((FIXTURES / f"{name}.json").read_text())
        assert document["benchmark"] == kind and document["machine"]["date"] and document["rows"]


def test_plot_tool_draws_every_kind(tmp_path: Path) -> None:
    paths = [str(FIXTURES / f"{name}.json") for name in KINDS]
    result = tool("tools/plot.py", *paths, "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for name in KINDS:
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000


def test_plot_refuses_documents_it_cannot_draw(tmp_path: Path) -> None:
    document = json.loads((FIXTURES / "train-digits.json").read_text())
    for row in document["rows"]:
        del row["epoch_loss"]
    with pytest.raises(InvalidArgumentError, match="epoch"):
        plot_document(document, tmp_path / "old.png")
    with pytest.raises(InvalidArgumentError, match="no plot"):
        plot_document({"benchmark": "unknown", "rows": [{}]}, tmp_path / "unknown.png")
    bad = tmp_path / "soak.json"
    bad.write_text(json.dumps({"benchmark": "soak", "rows": [{"rank": 0}]}))
    result = tool("tools/plot.py", str(bad), "-o", str(tmp_path))
    assert result.returncode == 1 and "not plotted" in result.stderr


def test_readme_section_is_generated_between_the_markers_only(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in KINDS:
        shutil.copy(FIXTURES / f"{name}.json", run)
        plot_document(json.loads((FIXTURES / f"{name}.json").read_text()), run / f"{name}.png")
    readme = tmp_path / "README.md"
    readme.write_text(README)
    result = tool("tools/report.py", "--readme", str(readme), str(run))
    assert result.returncode == 0, result.stderr
    text = readme.read_text()
    head, rest = text.split("<!-- bench:begin -->\n")
    generated, tail = rest.split("<!-- bench:end -->")
    assert head == README.split("<!-- bench:begin -->\n")[0]
    assert tail == README.split("<!-- bench:end -->")[1]
    assert "stale numbers" not in generated
    # collectives, sparse, kernels, train: in that order, each a table, a machine and date, a plot
    titles = [line for line in generated.splitlines() if line.startswith("**")]
    assert [title.split(":")[0] for title in titles] == ["**Collectives", "**Sparse vs dense", "**Kernels",
                                                         "**Training"]
    assert generated.count("_Measured 2026-11-24") == 4 and generated.count(" on vm: 2 CPUs") == 4
    assert "| size | op | algorithm |" in generated and "| 4 KiB | allreduce | gtopk | 1% |" in generated
    assert "| 2 | gloo |" in generated and "| dense | 100% |" in generated
    for name in KINDS:
        assert f"](docs/bench/{name}.png)" in generated
        assert (tmp_path / "docs" / "bench" / f"{name}.png").stat().st_size > 10_000
    again = tool("tools/report.py", "--readme", str(readme), str(run))  # idempotent
    assert again.returncode == 0 and readme.read_text() == text


def test_readme_without_markers_is_left_alone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIXTURES / "sparse-1gbit.json", run)
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n")
    result = tool("tools/report.py", "--readme", str(readme), str(run))
    assert result.returncode != 0 and "bench:begin" in result.stderr
    assert readme.read_text() == "# no markers here\n"
    assert not (tmp_path / "docs").exists()


def test_report_prints_tables_of_single_files() -> None:
    result = tool("tools/report.py", str(FIXTURES / "kernels.json"), str(FIXTURES / "train-digits.json"))
    assert result.returncode == 0, result.stderr
    assert "| d | density | torch.topk (ms)" in result.stdout and "quantize 25,000,000 float32" in result.stdout
    assert "| gtopk | 1% | 90.28% |" in result.stdout


def test_a_time_to_accuracy_document_is_drawn_from_its_curves(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    from sparsecoll.bench import plots

    document = json.loads((FIXTURES / "train-curves.json").read_text())
    png = plot_document(document, tmp_path / "tta.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    figure = Figure()
    plots._train(figure, document)
    time_axis, step_axis = figure.axes
    assert time_axis.get_title().startswith("time to accuracy") and step_axis.get_xlabel() == "step"
    drawn = {line.get_label(): line for line in time_axis.get_lines()}
    assert set(drawn) == {"DDP", "PowerSGD r4", "opt allgather 0.1%", "target"}
    ddp = next(row for row in document["rows"] if row["run"] == "DDP")
    assert list(drawn["DDP"].get_xdata()) == [point[1] for point in ddp["curve"]]  # seconds, not steps
