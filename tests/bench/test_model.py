"""``sparsecoll-bench model``: the cost model's prices over a range of P, in-process and cheap.

It must print the prices algorithm="auto" chooses by (the same formulas), report crossovers
where the formulas cross, keep two-level traffic between hosts within 1/L of the flat
algorithm's, put measured points beside the model, and refuse bad input in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from sparsecoll.bench import model as cost_view
from sparsecoll.bench.cli import app
from sparsecoll.collectives.cost_bytes import bytes_sent, two_level_bytes
from sparsecoll.collectives.cost_model import ALGORITHMS, CostModel
from tests.bench.test_cli import assert_png
from tests.bench.test_train_bad_input import assert_one_line_error

FIXTURES = Path(__file__).parent / "fixtures"
runner = CliRunner()


def links(alpha: float, beta: float, intra_alpha: float, intra_beta: float) -> cost_view.Links:
    inter = CostModel(alpha=alpha, beta=beta)
    return cost_view.Links(inter, CostModel(alpha=intra_alpha, beta=intra_beta))


def test_the_command_prints_what_auto_would_pick(tmp_path: Path) -> None:
    """With the same link inside and between hosts, the fastest of what would run (two-level
    where it can, flat otherwise) is CostModel.choose's pick, at every P of several hosts."""
    out = tmp_path / "model.json"
    result = runner.invoke(app, ["model", "--ranks", "2..256", "-d", "2M", "--density", "0.001", "--link", "1gbit",
                                 "--alpha", "50e-6", "--intra-link", "1gbit", "--intra-alpha", "50e-6",
                                 "--ranks-per-host", "4", "--json", str(out), "--plot", str(tmp_path / "m.png")])
    assert result.exit_code == 0, result.output
    assert_png(tmp_path / "m.png")
    document = json.loads(out.read_text())
    assert [row["ranks"] for row in document["rows"][::10]] == [2, 4, 8, 16, 32, 64, 128, 256]
    model = CostModel(alpha=50e-6, beta=8e-9)
    k = document["k"]
    for world in (8, 16, 64, 256):
        runs = {row["algorithm"].split()[0]: row["time_ms"] for row in document["rows"] if row["ranks"] == world
                and (row["algorithm"].endswith("2-level") or row["algorithm"] in ("sketch", "oktopk"))}
        assert set(runs) == set(ALGORITHMS)
        assert min(runs, key=runs.__getitem__) == model.choose(world, 2_000_000, k, two_level=(world // 4, 4))
    assert "overtakes" in result.output and "fastest" in result.output


@settings(max_examples=40, deadline=None)
@given(alpha=st.floats(1e-6, 1e-3), rate=st.floats(1e8, 1e11), intra_gain=st.floats(1, 100),
       size=st.integers(10_000, 50_000_000), density=st.floats(1e-4, 1e-2), per_host=st.sampled_from([1, 2, 4, 8]))
def test_a_crossover_is_where_the_formulas_cross(alpha: float, rate: float, intra_gain: float, size: int,
                                                density: float, per_host: int) -> None:
    priced = links(alpha, 8 / rate, alpha / intra_gain, 8 / rate / intra_gain)
    k = max(1, round(size * density))
    ranks = cost_view.parse_ranks("2..512")
    rows = cost_view.model_rows(priced, ranks, per_host, size, k, ALGORITHMS)

    def time_of(series: str, world: int) -> float:
        return cost_view.price(priced, series, world, per_host, size, k)["seconds"] * 1e3

    for item in cost_view.crossovers(rows, time_of, per_host):
        low, high = item["between"]
        at = item["ranks"]
        assert low < at <= high
        assert at <= per_host or at % per_host == 0
        assert time_of(item["faster"], at) < time_of(item["overtakes"], at)
        before = max([world for world in range(low, at) if world <= per_host or world % per_host == 0])
        assert time_of(item["faster"], before) >= time_of(item["overtakes"], before)


@settings(max_examples=60, deadline=None)
@given(hosts=st.integers(2, 256), per_host=st.integers(2, 16), size=st.integers(1000, 10**8),
       density=st.floats(1e-4, 0.05), algorithm=st.sampled_from(["allgather", "gtopk"]))
def test_two_levels_send_at_most_one_lth_of_flat_between_hosts(hosts: int, per_host: int, size: int, density: float,
                                                               algorithm: str) -> None:
    """1/L of the flat algorithm's bytes (all of them: with one rank a host all would leave it),
    up to the 72 bytes of header and count every frame carries, which two levels do not divide
    by L, and k/L rounded up: a frame of k/L pairs is at most 8k/L·(1 + 10L/k) bytes.

    gTop-k only where H and L are powers of two: elsewhere flat recursive doubling folds ranks
    that send one message, and its mean can fall below the hosts' rounds (32 hosts of 3: 4.67
    messages a rank flat, 5 rounds between hosts, so 1.07/L of the flat bytes)."""
    if algorithm == "gtopk":
        hosts, per_host = 1 << (hosts.bit_length() - 1), 1 << (per_host.bit_length() - 1)
    k = min(size, max(8 * per_host, round(size * density)))
    between = two_level_bytes(algorithm, hosts, per_host, size, k).inter_host
    assert 0 < between <= bytes_sent(algorithm, hosts * per_host, size, k) / per_host * (1 + 10 * per_host / k)


def test_measured_points_sit_beside_the_model(tmp_path: Path) -> None:
    out = tmp_path / "model.json"
    result = runner.invoke(app, ["model", "--ranks", "2..8", "-d", "200K", "--density", "0.01", "--link", "1gbit",
                                 "--measured", str(FIXTURES / "sparse-1gbit.json"), "--json", str(out),
                                 "--plot", str(tmp_path / "m.png")])
    assert result.exit_code == 0, result.output
    assert_png(tmp_path / "m.png")
    compared = {row["algorithm"]: row for row in json.loads(out.read_text())["measured"]}
    assert set(compared) == {"dense", "gtopk", "cltk"}  # gloo is not priced
    assert compared["dense"]["bytes_ratio"] == compared["gtopk"]["bytes_ratio"] == 1.0
    # the model's mean rank (the leader sends 16,192 B, the other 8,128 B) against rank 0, not the leader there
    assert compared["cltk"]["bytes_ratio"] == pytest.approx(12160 / 8128)
    gtopk = compared["gtopk"]
    assert gtopk["time_ratio"] == pytest.approx(gtopk["model_ms"] / 7.576220999908401)
    assert "model/measured" in result.output


@pytest.mark.parametrize(("arguments", "needle"), [
    (["--ranks", "1"], "--ranks needs at least 2 ranks"),
    (["--ranks", "1..8"], "--ranks needs at least 2 ranks"),
    (["--ranks", "2..x"], "is not a range like 2..1024"),
    (["--ranks", "64..8"], "ends below its start"),
    (["--ranks", "2..24", "--ranks-per-host", "3"], "--ranks-per-host 3 does not divide --ranks 4"),
    (["--algorithms", "gtopk,nope"], "--algorithms takes dense, allgather"),
    (["--link", "fast"], "is not like 1gbit"),
    (["--link", "1gbit", "--beta", "1e-9"], "give one"),
    (["--alpha", "-1"], "--alpha must be"),
    (["--measured", "/nonexistent/sparse.json"], "--measured /nonexistent/sparse.json"),
])
def test_bad_input_is_one_line_and_status_2(arguments: list[str], needle: str) -> None:
    result = runner.invoke(app, ["model", *arguments])
    assert_one_line_error(result.output, result.exit_code, needle)


def test_a_document_that_is_not_the_sparse_bench_is_refused(tmp_path: Path) -> None:
    wrong = tmp_path / "kernels.json"
    wrong.write_text(json.dumps({"benchmark": "kernels", "rows": []}))
    result = runner.invoke(app, ["model", "--measured", str(wrong)])
    assert_one_line_error(result.output, result.exit_code, "is not a `sparsecoll-bench sparse --json` document")


def test_a_flat_algorithm_is_priced_on_the_link_it_crosses() -> None:
    """Inside one host (P <= L) on the link inside it, across hosts on the link between them."""
    priced = links(5e-5, 8e-9, 5e-6, 8e-11)
    for world, model in ((4, priced.intra), (8, priced.inter)):
        point = cost_view.price(priced, "dense", world, 4, 2_000_000, 2_000)
        assert point["seconds"] == model.predict("dense", world, 2_000_000, 2_000)
    assert cost_view.price(priced, "dense 2-level", 4, 4, 2_000_000, 2_000)["inter_host_bytes"] == 0
