"""Epochs to target accuracy from ``sparsecoll-bench train --json`` files.

The target is the dense row's final test accuracy less ``--margin`` points (0.5), taken from the
same file (the same run); a row reaches it at the first epoch whose test accuracy is at least
the target. Bytes to target sum the row's ``epoch_bytes`` up to that epoch (rank 0's, as sent).

    python tools/epochs_to_target.py run.json [more.json ...] [--margin 0.5]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any


def epochs_to(accuracies: Sequence[float], target: float) -> int | None:
    """The first epoch (counted from 1) whose accuracy reaches ``target``, or None."""
    return next((epoch + 1 for epoch, accuracy in enumerate(accuracies) if accuracy >= target), None)


def lever(row: dict[str, Any]) -> str:
    """What a row changed against the plain compressed run."""
    parts = [row.get("density_schedule", "")]
    for key, name in (("lr_scale", "lr x{}"), ("warmup_epochs", "warm-up {} ep"), ("memory_beta", "beta {}"),
                      ("critical_density", "critical {}")):
        if key in row:
            parts.append(name.format(row[key]))
    if row.get("per_layer"):
        parts.append("per-layer")
    if row.get("momentum_correction") is False:
        parts.append("no mom. corr.")
    if row.get("dense_epochs"):
        parts.append(f"dense {row['dense_epochs']} ep")
    return ", ".join(part for part in parts if part) or "-"


def epoch_bytes(row: dict[str, Any]) -> list[float]:
    """The row's bytes a epoch; for files written before rows carried them, a fixed-density row's
    are rebuilt from its averages (every epoch after the first as the last, the first the rest)."""
    if "epoch_bytes" in row:
        return row["epoch_bytes"]
    if row.get("density_schedule"):
        return []
    epochs = len(row["epoch_accuracy"])
    steps_per_epoch = row["steps"] // epochs
    steady = row["steady_bytes_per_step"] * steps_per_epoch
    first = row["bytes_per_step"] * row["steps"] - (epochs - 1) * steady
    return [first] + [steady] * (epochs - 1)


def summarize(document: dict[str, Any], margin: float, dense_accuracy: float | None = None) -> list[dict[str, Any]]:
    """One line a row: epochs and steps to target, final accuracy, bytes a step and to target.

    The target comes from the file's dense row at the plain learning rate, else from
    ``dense_accuracy`` (an earlier file's: loopback accuracies repeat exactly from run to run).
    """
    rows = document["rows"]
    dense = next((row for row in rows if row["algorithm"] == "dense" and "lr_scale" not in row), None)
    if dense is None and dense_accuracy is None:
        raise ValueError("no dense row to take the target from: list a file with one first")
    target = (dense["accuracy"] if dense else dense_accuracy) - margin / 100
    lines = []
    for row in rows:
        epochs = epochs_to(row["epoch_accuracy"], target)
        steps_per_epoch = row["steps"] // len(row["epoch_accuracy"])
        to_target = sum(epoch_bytes(row)[:epochs]) if epochs and epoch_bytes(row) else None
        lines.append({"algorithm": row["algorithm"], "density": row["density"], "lever": lever(row),
                      "epochs": epochs, "steps": epochs * steps_per_epoch if epochs else None,
                      "final": row["accuracy"], "bytes_per_step": row["bytes_per_step"],
                      "bytes_to_target": to_target, "target": target})
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--margin", type=float, default=0.5, help="points below dense's final accuracy")
    args = parser.parse_args(argv)
    print("| file | algorithm | density | lever | epochs (steps) to target | final acc | bytes/step | "
          "bytes to target |")
    print("|---|---|---|---|---|---|---|---|")
    dense_accuracy = None
    for path in args.files:
        with open(path) as handle:
            document = json.load(handle)
        lines = summarize(document, args.margin, dense_accuracy)
        dense_accuracy = lines[0]["target"] + args.margin / 100
        for line in lines:
            reached = f"{line['epochs']} ({line['steps']})" if line["epochs"] else "-"
            to_target = f"{line['bytes_to_target'] / 1e6:.2f} MB" if line["bytes_to_target"] else "-"
            print(f"| {path.rsplit('/', 1)[-1]} | {line['algorithm']} | {100 * line['density']:g}% | "
                  f"{line['lever']} | {reached} | {100 * line['final']:.2f}% | "
                  f"{line['bytes_per_step'] / 1e3:.1f} kB | {to_target} |")
        print(f"target {100 * line['target']:.2f}% (dense final less {args.margin} point) in {path}")


if __name__ == "__main__":
    main()
