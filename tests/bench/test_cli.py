"""The sparsecoll-bench CLI on real local ranks: correct results, JSON that tools can read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsecoll.bench.cli import app
from sparsecoll.bench.common import format_size, parse_size, size_sweep

runner = CliRunner()


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
                                 "--iters", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["algorithm"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dense", "gloo", "allgather", "gtopk", "sketch", "cltk", "selection"}
    for name in ("allgather", "gtopk"):
        assert rows[name]["bytes_sent"] == rows[name]["formula_bytes"]
    for row in rows.values():
        assert row["wrong"] == 0 and row["time_ms"] > 0 and row["speedup_vs_gloo"] > 0
    assert rows["allgather"]["bytes_sent"] < rows["dense"]["bytes_sent"] / 20


@pytest.mark.slow
def test_emulated_links_are_created_shaped_and_removed(tmp_path: Path) -> None:
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("tc") is None:
        pytest.skip("network namespaces and tc need root")
    out = tmp_path / "link.json"
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    result = runner.invoke(app, ["sparse", "--ranks", "2", "-d", "2M", "--density", "0.001", "--iters", "1",
                                 "--algorithms", "dense,gloo,gtopk", "--link", "100mbit", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["algorithm"]: row for row in json.loads(out.read_text())["rows"]}
    # 8 MB of float32 over a 100 Mbit/s link: the dense allreduce cannot beat the wire
    assert rows["dense"]["time_ms"] > 0.9 * rows["dense"]["bytes_sent"] * 8 / 100e6 * 1e3
    assert rows["gtopk"]["speedup_vs_gloo"] > 5
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert after == before, "namespaces were left behind"
