"""Time to target accuracy: the figure a user who trains over a slow network cares about.

The target is the dense baseline's final test accuracy less half a point (DDP's, else
sparsecoll's dense row). A row's time to target is the training wall-clock (evaluation
excluded) at the first evaluation where its test accuracy reached the target; None ("-") if it
never did. Ratios compare it with DDP dense's and with the best PowerSGD row's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TARGET_MARGIN = 0.005
"""Half a point of accuracy below the dense run's final one."""
_TOLERANCE = 1e-9
"""Accuracies are counts over the test set: 0.93 - 0.005 must accept an accuracy of 0.925."""


def time_to_target(curve: Sequence[Sequence[float]], target: float) -> tuple[float, int] | None:
    """(training seconds, step) of the first point of ``curve`` at or above ``target``.

    ``curve`` holds (step, training seconds, test accuracy) triples in the order measured.
    """
    for step, seconds, accuracy in curve:
        if accuracy >= target - _TOLERANCE:
            return float(seconds), int(step)
    return None


def dense_baseline(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The row whose final accuracy sets the target: DDP dense, else sparsecoll's dense run."""
    for method, algorithm in (("ddp", None), ("optimizer", "dense")):
        for row in rows:
            if row.get("method", "optimizer") == method and algorithm in (None, row.get("algorithm")):
                if row.get("accuracy") is not None:
                    return row
    return None


def add_time_to_target(rows: Sequence[dict[str, Any]], margin: float = TARGET_MARGIN) -> float | None:
    """Fill every row's ``time_to_target`` and ``steps_to_target`` (None: never reached) and the
    ratios ``tta_vs_ddp`` and ``tta_vs_powersgd`` (how many times faster than DDP dense and than
    the fastest PowerSGD row to reach it); returns the target (None without a dense baseline)."""
    baseline = dense_baseline(rows)
    if baseline is None:
        return None
    target = baseline["accuracy"] - margin
    for row in rows:
        reached = time_to_target(row.get("curve") or (), target)
        row["target_accuracy"] = target
        row["time_to_target"], row["steps_to_target"] = reached if reached else (None, None)
    ddp = next((row["time_to_target"] for row in rows if row.get("method") == "ddp"), None)
    powersgd = [row["time_to_target"] for row in rows
                if row.get("method") == "powersgd" and row["time_to_target"] is not None]
    best_powersgd = min(powersgd) if powersgd else None
    for row in rows:
        mine = row["time_to_target"]
        row["tta_vs_ddp"] = ddp / mine if ddp and mine else None
        row["tta_vs_powersgd"] = best_powersgd / mine if best_powersgd and mine else None
    return target
