"""``sparsecoll-bench model --cores-per-host C --one-machine``: the measured setting (every rank on
this 2-core VM) priced and printed beside the stored measurements, with the ratio; without the
option the prediction is a core a rank, as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsecoll.bench import model as cost_view
from sparsecoll.bench.cli import app
from sparsecoll.collectives.cost_contention import SharedCores
from sparsecoll.collectives.cost_model import CostModel
from tests.bench.test_train_bad_input import assert_one_line_error

STORED = Path(__file__).parents[2] / "docs" / "bench" / "oktopk"
runner = CliRunner()
MEASURED = [argument for name in ("p2-4-8-1gbit.json", "p16-1gbit.json", "p32-1gbit.json")
            for argument in ("--measured", str(STORED / name))]


def test_the_measured_setting_prints_measured_beside_model(tmp_path: Path) -> None:
    out = tmp_path / "model.json"
    result = runner.invoke(app, ["model", "--ranks", "2..32", "--link", "1gbit", "--alpha", "50e-6",
                                 "--algorithms", "allgather,gtopk,cltk,oktopk", "--cores-per-host", "2",
                                 "--one-machine", "--local-costs", str(STORED / "one-core-costs.json"), *MEASURED,
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    compared = json.loads(out.read_text())["measured"]
    assert sorted({row["ranks"] for row in compared}) == [2, 4, 8, 16, 32]
    assert len(compared) == 20
    inside = [row for row in compared if abs(row["time_ratio"] - 1) <= 0.25]
    assert len(inside) >= 17, [(row["algorithm"], row["ranks"], round(row["time_ratio"], 2)) for row in compared]
    assert f"{len(inside)} of 20 points within 25%" in result.output
    assert "all ranks on one machine of 2 cores" in result.output


def test_without_cores_a_rank_has_a_core_of_its_own() -> None:
    """No --cores-per-host: the price is CostModel.predict's, whatever P (the default for a cluster)."""
    model = CostModel(alpha=5e-5, beta=8e-9)
    plain = cost_view.Links(model, model)
    for world in (2, 32, 1024):
        point = cost_view.price(plain, "gtopk", world, 1, 25_000_000, 25_000)
        assert point["seconds"] == model.predict("gtopk", world, 25_000_000, 25_000)


@pytest.mark.parametrize(("one_machine", "sharing"), [(True, 32), (False, 4)])
def test_one_machine_shares_every_rank_else_a_hosts(one_machine: bool, sharing: int) -> None:
    model = CostModel(alpha=5e-5, beta=8e-9)
    links = cost_view.Links(model, model, cost_view.Cores(2, one_machine))
    point = cost_view.price(links, "gtopk 2-level", 32, 4, 25_000_000, 25_000)
    shared = SharedCores(sharing, 2).apply(model)
    assert point["seconds"] == shared.predict_two_level("gtopk", 8, 4, 25_000_000, 25_000, intra=shared)


@pytest.mark.parametrize(("arguments", "needle"), [
    (["--one-machine"], "--one-machine needs --cores-per-host"),
    (["--cores-per-host", "0"], "--cores-per-host"),
    (["--local-costs", "/nonexistent/costs.json"], "cannot read cost model /nonexistent/costs.json"),
])
def test_bad_core_options_are_one_line(arguments: list[str], needle: str) -> None:
    result = runner.invoke(app, ["model", "--ranks", "2..8", *arguments])
    assert_one_line_error(result.output, result.exit_code, needle)
