"""``sparsecoll-bench train --memory-beta/--no-momentum-correction``: ScaleCom's table from the command line.

The flags reach every compressed configuration (and the optimizer: the rows report what it
used), and a bad beta is refused in one line before any rank starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsecoll.bench import train
from sparsecoll.bench.cli import app

runner = CliRunner()


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "abc", ""])
def test_a_bad_memory_beta_is_refused_before_any_rank_starts(value: str) -> None:
    result = runner.invoke(app, ["train", "--dataset", "digits", "--memory-beta", value])
    output = result.output.strip()
    assert result.exit_code == 2 and output.startswith("error:") and "--memory-beta" in output, output
    assert "\n" not in output and "starting" not in output, output


def test_configurations_take_each_beta_and_the_momentum_correction_switch() -> None:
    assert train.parse_configs("dense,cltk", "0.01") == [{"algorithm": "dense", "density": 1.0},
                                                          {"algorithm": "cltk", "density": 0.01}]
    configs = train.parse_configs("dense,cltk,gtopk", "0.01,0.001", [1.0, 0.1], momentum_correction=False)
    assert [(c["algorithm"], c["density"], c.get("memory_beta")) for c in configs] == [
        ("dense", 1.0, None), ("cltk", 0.01, 1.0), ("cltk", 0.01, 0.1), ("gtopk", 0.01, 1.0), ("gtopk", 0.01, 0.1),
        ("cltk", 0.001, 1.0), ("cltk", 0.001, 0.1), ("gtopk", 0.001, 1.0), ("gtopk", 0.001, 0.1)]
    assert all(config["momentum_correction"] is False for config in configs)


def test_the_flags_reach_the_optimizer_of_every_rank(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    result = runner.invoke(app, ["train", "--dataset", "digits", "--ranks", "2", "--epochs", "1", "--batch", "16",
                                 "--algorithms", "dense,cltk", "--densities", "0.01", "--memory-beta", "1,0.1",
                                 "--baselines", "none", "--hooks", "none",
                                 "--no-momentum-correction", "--json", str(out)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    dense, plain, filtered = json.loads(out.read_text())["rows"]
    assert (plain["algorithm"], plain["memory_beta_used"]) == ("cltk", 1.0)
    assert (filtered["algorithm"], filtered["memory_beta_used"]) == ("cltk", 0.1)
    assert not any(row["momentum_correction_used"] for row in (dense, plain, filtered))
    assert plain["accuracy"] != filtered["accuracy"] or plain["final_loss"] != filtered["final_loss"]
    assert "mom. corr. False" in result.output and " beta " in result.output, result.output
