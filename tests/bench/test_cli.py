"""The sparsecoll-bench CLI on real local ranks: correct results, JSON that tools can read,
plots that people can look at."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsecoll.bench.cli import app
from sparsecoll.bench.common import format_size, parse_size, size_sweep
from sparsecoll.wire import HEADER_SIZE

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_no_namespaces_left() -> None:
    """None of this process's emulated-link namespaces outlive the command (other processes'
    namespaces may come and go meanwhile)."""
    import os
    import subprocess

    listed = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    assert f"sc{os.getpid() % 100000}-" not in listed, f"namespaces were left behind: {listed}"


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000


def test_sizes_parse_like_nccl_tests() -> None:
    assert [parse_size(text) for text in ("8", "1K", "64M", "1G", "2kb")] == [8, 1024, 64 << 20, 1 << 30, 2048]
    assert size_sweep(1024, 16384, 4) == [1024, 4096, 16384]
    assert format_size(64 << 20) == "64M" and format_size(1000) == "1000"
    with pytest.raises(ValueError):
        parse_size("lots")
    with pytest.raises(ValueError):
        size_sweep(8, 4, 2)


def test_collectives_sweep_writes_checked_rows(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    result = runner.invoke(app, ["collectives", "-b", "1K", "-e", "256K", "-f", "16", "-n", "3",
                                 "--ranks", "2", "--ops", "allreduce,allgather,broadcast",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["machine"]["cpus"] >= 1 and document["ranks"] == 2
    rows = document["rows"]
    assert [row["op"] for row in rows] == ["allreduce"] * 3 + ["allgather"] * 3 + ["broadcast"] * 3
    for row in rows:
        assert row["wrong"] == 0 and row["time_us"] > 0 and row["gloo_time_us"] > 0
        assert row["busbw"] > 0 and row["ratio"] > 0
    allreduce_256k = rows[2]
    # ring on 2 ranks: 2(P-1)/P of the array (half in each phase), plus two frame headers
    assert allreduce_256k["bytes_sent"] == (256 << 10) + 2 * 64
    assert "busbw" in result.output


def test_soak_keeps_descriptors_and_memory(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    result = runner.invoke(app, ["soak", "--ranks", "2", "--iters", "500", "--json", str(out)])
    assert result.exit_code == 0, result.output
    for row in json.loads(out.read_text())["rows"]:
        assert row["errors"] == 0
        assert row["fds_after"] == row["fds_before"]
        assert row["rss_growth_pct"] < 5.0


def test_sparse_comparison_rows_agree_with_their_formulas(tmp_path: Path) -> None:
    out = tmp_path / "sparse.json"
    result = runner.invoke(app, ["sparse", "--ranks", "2", "-d", "200K", "--density", "0.01",
                                 "--iters", "1", "--json", str(out), "--plot", str(tmp_path / "sparse.png")])
    assert result.exit_code == 0, result.output
    assert_png(tmp_path / "sparse.png")
    rows = {row["algorithm"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dense", "gloo", "allgather", "gtopk", "sketch", "cltk", "oktopk", "selection"}
    for name in ("allgather", "gtopk"):
        assert rows[name]["bytes_sent"] == rows[name]["formula_bytes"]
    assert 0 < rows["oktopk"]["bytes_sent"] <= rows["oktopk"]["formula_bytes"]  # the paper's bound
    for row in rows.values():
        assert row["wrong"] == 0 and row["time_ms"] > 0 and row["speedup_vs_gloo"] > 0
    assert rows["allgather"]["bytes_sent"] < rows["dense"]["bytes_sent"] / 20


@pytest.mark.slow
def test_emulated_links_are_created_shaped_and_removed(tmp_path: Path) -> None:
    import os
    import shutil

    if os.geteuid() != 0 or shutil.which("tc") is None:
        pytest.skip("network namespaces and tc need root")
    out = tmp_path / "link.json"
    result = runner.invoke(app, ["sparse", "--ranks", "2", "-d", "2M", "--density", "0.001", "--iters", "1",
                                 "--algorithms", "dense,gloo,gtopk", "--link", "100mbit", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["algorithm"]: row for row in json.loads(out.read_text())["rows"]}
    # 8 MB of float32 over a 100 Mbit/s link: the dense allreduce cannot beat the wire
    assert rows["dense"]["time_ms"] > 0.9 * rows["dense"]["bytes_sent"] * 8 / 100e6 * 1e3
    assert rows["gtopk"]["speedup_vs_gloo"] > 5
    assert_no_namespaces_left()


@pytest.mark.slow
@pytest.mark.ucx
def test_ucx_sweep_over_emulated_links(tmp_path: Path) -> None:
    import os
    import shutil

    if os.geteuid() != 0 or shutil.which("tc") is None:
        pytest.skip("network namespaces and tc need root")
    pytest.importorskip("ucxx")
    out = tmp_path / "link.json"
    result = runner.invoke(app, ["collectives", "--ranks", "2", "-b", "1M", "-e", "1M", "-n", "2", "-w", "1",
                                 "--algorithms", "dense,gloo,cltk", "--density", "0.001", "--link", "100mbit",
                                 "--backend", "ucx", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["algorithm"]: row for row in json.loads(out.read_text())["rows"]}
    # 1 MiB over a 100 Mbit/s link: UCX, kept on the shaped link, cannot beat the wire
    assert rows["dense"]["time_us"] > 0.9 * rows["dense"]["bytes_sent"] * 8 / 100e6 * 1e6
    assert rows["cltk"]["min_us"] < rows["cltk"]["gloo_time_us"] / 5 and rows["cltk"]["wrong"] == 0
    assert_no_namespaces_left()


def test_sparse_algorithms_sweep_with_checks_bytes_and_a_plot(tmp_path: Path) -> None:
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    result = runner.invoke(app, ["collectives", "-b", "1K", "-e", "4K", "-f", "4", "-n", "2", "--ranks", "2",
                                 "--algorithms", "dense,gloo,allgather,gtopk,sketch,cltk", "--density", "0.01",
                                 "--json", str(out), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["backend"] == "tcp" and document["link"] == "loopback"
    rows = {(row["algorithm"], row["size"]): row for row in document["rows"]}
    assert set(rows) == {(name, size) for name in ("dense", "allgather", "gtopk", "sketch", "cltk")
                         for size in (1024, 4096)}
    for (name, size), row in rows.items():
        assert row["wrong"] == 0 and row["time_us"] > 0 and row["gloo_time_us"] > 0, row
        assert row["count"] == size // 4 and row["busbw"] == row["algbw"]  # 2 ranks: 2(P-1)/P = 1
        assert row["ratio"] == row["gloo_time_us"] / row["time_us"]
        if name != "dense":
            assert row["k"] == max(1, round(row["count"] * 0.01)) and row["density"] == 0.01
    for name in ("allgather", "gtopk"):  # on 2 ranks: one block of k (index, value) pairs
        row = rows[(name, 4096)]
        assert row["bytes_sent"] == 8 + 8 * row["k"] + HEADER_SIZE
    assert rows[("cltk", 4096)]["bytes_sent"] < rows[("dense", 4096)]["bytes_sent"] / 10
    assert_png(plot)


@pytest.mark.ucx
def test_quantized_sweep_over_ucx(tmp_path: Path) -> None:
    pytest.importorskip("ucxx")
    out = tmp_path / "ucx.json"
    result = runner.invoke(app, ["collectives", "-b", "16K", "-e", "16K", "-n", "2", "--ranks", "2",
                                 "--algorithms", "allgather,gtopk", "--density", "0.01", "--quantize-bits", "0,8",
                                 "--backend", "ucx", "--json", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["backend"] == "ucx"
    rows = {(row["algorithm"], row["bits"]): row for row in document["rows"]}
    assert set(rows) == {(name, bits) for name in ("allgather", "gtopk") for bits in (None, 8)}
    for name in ("allgather", "gtopk"):
        assert rows[(name, 8)]["wrong"] == rows[(name, None)]["wrong"] == 0
        assert rows[(name, 8)]["bytes_sent"] < rows[(name, None)]["bytes_sent"]


def test_unknown_algorithm_is_a_clean_error() -> None:
    result = runner.invoke(app, ["collectives", "--algorithms", "dense,nope", "--ranks", "2"])
    assert result.exit_code == 2
    assert "nope" in result.output and "Traceback" not in result.output


def test_train_records_curves_and_plots_them(tmp_path: Path) -> None:
    out, plot = tmp_path / "train.json", tmp_path / "train.png"
    result = runner.invoke(app, ["train", "--dataset", "digits", "--ranks", "2", "--epochs", "2",
                                 "--algorithms", "dense,gtopk", "--densities", "0.01", "--batch", "16",
                                 "--baselines", "none", "--hooks", "none",
                                 "--json", str(out), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["dataset"] == "digits" and document["world"] == 2 and document["machine"]["date"]
    dense, gtopk = document["rows"]
    assert (dense["algorithm"], gtopk["algorithm"], gtopk["density"]) == ("dense", "gtopk", 0.01)
    for row in (dense, gtopk):
        assert len(row["epoch_loss"]) == len(row["epoch_accuracy"]) == 2
        assert row["epoch_accuracy"][-1] == row["accuracy"] > 0.5
        assert all(math.isfinite(loss) for loss in row["epoch_loss"]) and row["seconds_per_step"] > 0
    assert dense["compression"] == 1.0 and gtopk["compression"] > 10
    assert_png(plot)


def test_kernels_write_json_and_plot(tmp_path: Path) -> None:
    out, plot = tmp_path / "kernels.json", tmp_path / "kernels.png"
    result = runner.invoke(app, ["kernels", "--sizes", "100K", "--densities", "0.01", "--repeats", "1",
                                 "--no-throughput", "--no-jit", "--json", str(out), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["machine"]["cpus"] >= 1
    (row,) = document["rows"]
    assert row["kind"] == "selection" and row["size"] == 100_000 and row["correct"]
    assert_png(plot)


def test_demo_runs_dense_and_sparse_against_gloo(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    result = runner.invoke(app, ["demo", "--ranks", "2", "--link", "loopback", "--size", "200K", "--iters", "1",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrong" in result.output and "vs Gloo" in result.output, result.output  # the table shows both
    assert result.output.rstrip().splitlines()[-1].startswith("On loopback, gTop-k at 0.1%"), result.output
    document = json.loads(out.read_text())
    assert document["command"] == "demo" and document["link"] == "loopback"
    rows = document["rows"]
    assert [row["algorithm"] for row in rows] == ["dense", "gloo", "gtopk", "cltk"], rows
    assert all(row["wrong"] == 0 and row["d"] == 200_000 and row["ranks"] == 2 for row in rows), rows
    gloo_ms = rows[1]["time_ms"]
    assert all(row["speedup_vs_gloo"] == pytest.approx(gloo_ms / row["time_ms"]) for row in rows), rows
    sent = {row["algorithm"]: row["bytes_sent"] for row in rows}
    assert 800_000 <= sent["dense"] < 801_000, rows  # the ring: 2(P-1)/P of 800 KB, and its frames' headers
    assert sent["gtopk"] < sent["dense"] / 100 and sent["cltk"] < sent["dense"] / 100, rows  # 0.1%: k of d


def test_a_compressor_registered_by_an_imported_module_runs_by_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SPARSECOLL_BENCH_IMPORT", "")  # the command sets it; monkeypatch restores it
    out = tmp_path / "plugin.json"
    result = runner.invoke(app, ["--import", "tests.codecs", "sparse", "--ranks", "2", "--size", "20K",
                                 "--density", "0.01", "-n", "2", "--algorithms", "dense,test-sign,topk",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["algorithm"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dense", "test-sign", "topk"}
    assert all(row["wrong"] == 0 for row in rows.values()), rows
    # 1 bit a value plus a scale, against 32 bits a value: the sign codec sends ~1/32 of dense's bytes
    assert rows["test-sign"]["bytes_sent"] < rows["dense"]["bytes_sent"] / 20
    missing = runner.invoke(app, ["--import", "no.such.module", "sparse", "--ranks", "2"])
    assert missing.exit_code == 2 and "no.such.module" in missing.output


def test_calibrate_saves_the_model_that_sparse_then_reports_auto_against(tmp_path: Path, monkeypatch) -> None:
    model = tmp_path / "cost.json"
    result = runner.invoke(app, ["calibrate", "--ranks", "2", "-o", str(model)])
    assert result.exit_code == 0, result.output
    assert json.loads(model.read_text())["alpha"] > 0
    monkeypatch.setenv("SPARSECOLL_COST_MODEL", str(model))
    out = tmp_path / "sparse.json"
    result = runner.invoke(app, ["sparse", "--ranks", "2", "--size", "100K", "--density", "0.01", "-n", "2",
                                 "--algorithms", "dense,allgather,gtopk,cltk", "--json", str(out)])
    assert result.exit_code == 0, result.output
    gap = json.loads((tmp_path / "sparse-auto.json").read_text())
    assert gap["model"] == str(model)
    (row,) = gap["rows"]
    assert row["pick"] in ("dense", "allgather", "gtopk", "cltk") and row["gap_pct"] >= 0


def test_baselines_are_not_timed_as_reductions() -> None:
    import tests.codecs  # noqa: F401  (registers "test-sign")
    from sparsecoll.bench.sparse import reduces

    # "dense" is also a registered collective's name; the bench times it as the baseline
    assert [reduces(name) for name in ("dense", "gloo", "selection", "gtopk", "test-sign", "nope")] == [
        False, False, False, True, True, False]
