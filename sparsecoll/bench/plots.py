"""Plots of benchmark documents (what ``--json`` writes), for people; PNG through matplotlib.

Matplotlib is imported only when a plot is drawn, and through its object API on the Agg
canvas, so no GUI backend or global pyplot state is touched. Every figure carries the machine
and date of its numbers in a footer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsecoll.bench.common import format_size
from sparsecoll.errors import InvalidArgumentError

Document = dict[str, Any]


def plot_document(document: Document, path: str | Path) -> Path:
    """Draw one benchmark document to ``path`` (PNG); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kind = document.get("benchmark")
    draw = _DRAWERS.get(kind)
    if draw is None:
        raise InvalidArgumentError(f"no plot for benchmark {kind!r}; plotted: {', '.join(sorted(_DRAWERS))}")
    if not document.get("rows"):
        raise InvalidArgumentError(f"the {kind} document has no rows to plot")
    figure = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    draw(figure, document)
    figure.text(0.0, -0.02, provenance(document), fontsize=7, color="0.4", ha="left", va="top")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def provenance(document: Document) -> str:
    """Where and when the numbers were measured, in one line."""
    machine = document.get("machine") or {}
    return (f"{machine.get('date', 'date unknown')}, {machine.get('host', 'host unknown')}: "
            f"{machine.get('cpus', '?')} CPUs ({machine.get('processor', '?')}), Python {machine.get('python', '?')}, "
            f"torch {machine.get('torch', '?')}")


def series_label(row: dict[str, Any], with_op: bool = True) -> str:
    """'allreduce gtopk 1% 8-bit': what distinguishes one line of a sweep from another."""
    parts = [row.get("op", "allreduce")] if with_op else []
    parts.append(row.get("algorithm", "dense"))
    if row.get("density") is not None and row.get("algorithm") != "dense":
        parts.append(f"{100 * row['density']:g}%")
    if row.get("bits"):
        parts.append(f"{row['bits']}-bit")
    return " ".join(str(part) for part in parts)


def _collectives(figure: Any, document: Document) -> None:
    time_axis, bus_axis = figure.subplots(1, 2)
    series: dict[str, list[dict]] = {}
    baselines: dict[str, dict[int, dict]] = {}
    with_op = len({row.get("op") for row in document["rows"]}) > 1
    for row in document["rows"]:
        series.setdefault(series_label(row, with_op), []).append(row)
        if row.get("gloo_time_us") is not None:
            baselines.setdefault(row.get("op", "allreduce"), {})[row["size"]] = row
    for label, rows in series.items():
        rows = sorted(rows, key=lambda row: row["size"])
        sizes = [row["size"] for row in rows]
        line, = time_axis.plot(sizes, [row["time_us"] for row in rows], marker="o", ms=3, label=label)
        bus_axis.plot(sizes, [row["busbw"] for row in rows], marker="o", ms=3, color=line.get_color(), label=label)
    for op, by_size in baselines.items():
        sizes = sorted(by_size)
        label = f"{op} Gloo" if with_op else "Gloo (dense)"
        time_axis.plot(sizes, [by_size[s]["gloo_time_us"] for s in sizes], "k--", lw=1, label=label)
        bus_axis.plot(sizes, [by_size[s]["gloo_busbw"] for s in sizes], "k--", lw=1, label=label)
    link = document.get("link") or "loopback"
    title = f"{document.get('ranks', '?')} ranks, {document.get('backend', 'tcp')}, {link}"
    _axes(time_axis, "message size (bytes)", "time per call (us)", f"time, {title}", logy=True)
    _axes(bus_axis, "message size (bytes)", "busbw (GB/s)", "bus bandwidth (sparse: dense equivalent)", logy=True)


def _sparse(figure: Any, document: Document) -> None:
    time_axis, bytes_axis = figure.subplots(1, 2)
    rows = document["rows"]
    algorithms = list(dict.fromkeys(row["algorithm"] for row in rows))
    worlds = sorted({row["ranks"] for row in rows})
    width = 0.8 / len(worlds)
    for position, world in enumerate(worlds):
        by_algorithm = {row["algorithm"]: row for row in rows if row["ranks"] == world}
        xs = [index + position * width for index, name in enumerate(algorithms) if name in by_algorithm]
        chosen = [by_algorithm[name] for name in algorithms if name in by_algorithm]
        time_axis.bar(xs, [row["time_ms"] for row in chosen], width, label=f"P={world}")
        wire = [(x, _wire_bytes(row)) for x, row in zip(xs, chosen) if _wire_bytes(row)]
        bytes_axis.bar([x for x, _ in wire], [value for _, value in wire], width, label=f"P={world}")
    for axis in (time_axis, bytes_axis):
        axis.set_xticks([index + 0.4 - width / 2 for index in range(len(algorithms))], algorithms, rotation=20)
    first = rows[0]
    title = f"d={first['d']:,}, k={first['k']:,}, {document.get('link', 'loopback')}"
    _axes(time_axis, None, "time per call (ms)", f"time, {title}", logx=False, logy=True)
    _axes(bytes_axis, None, "bytes sent per rank and call", "wire bytes (Gloo: formula)", logx=False, logy=True)


def _wire_bytes(row: dict[str, Any]) -> int:
    """Bytes a rank sent, or the formula's where the row cannot count them (Gloo)."""
    sent = row.get("bytes_sent")
    return int(row.get("formula_bytes") or 0) if sent is None else int(sent)


def _kernels(figure: Any, document: Document) -> None:
    selection = [row for row in document["rows"] if row.get("kind") == "selection"]
    quantize = [row for row in document["rows"] if row.get("kind") == "quantize"]
    axes = figure.subplots(1, 2 if quantize else 1, squeeze=False)[0]
    methods = [("torch_topk_ms", "torch.topk"), ("argpartition_ms", "np.argpartition"),
               ("fast_ms", "ours fast"), ("exact_ms", "ours exact"), ("threshold_ms", "threshold pass")]
    width = 0.8 / len(methods)
    for position, (key, label) in enumerate(methods):
        axes[0].bar([index + position * width for index in range(len(selection))],
                    [row[key] for row in selection], width, label=label)
    axes[0].set_xticks([index + 0.4 - width / 2 for index in range(len(selection))],
                       [f"{row['size']:,}\n{100 * row['density']:g}%" for row in selection])
    _axes(axes[0], "elements / density", "time (ms)", "top-k selection, float32, CPU", logx=False, logy=True)
    if quantize:
        bits = [str(row["bits"]) for row in quantize]
        axes[1].plot(bits, [row["quantize_gbps"] for row in quantize], marker="o", label="quantize")
        axes[1].plot(bits, [row["dequantize_gbps"] for row in quantize], marker="o", label="dequantize")
        _axes(axes[1], "bits per value", "GB/s of float32", f"quantization, {quantize[0]['size']:,} values",
              logx=False)


def _train(figure: Any, document: Document) -> None:
    if any(row.get("curve") for row in document["rows"]):
        _time_to_accuracy(figure, document)
        return
    rows = [row for row in document["rows"] if row.get("epoch_loss")]
    if not rows:
        raise InvalidArgumentError("this train document has no per-epoch curves (epoch_loss) nor "
                                   "accuracy curves (curve)")
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    for row in rows:
        label = row["algorithm"] if row["algorithm"] == "dense" else f"{row['algorithm']} {100 * row['density']:g}%"
        if row.get("error_feedback") is False:
            label += " no EF"
        epochs = range(1, len(row["epoch_loss"]) + 1)
        line, = loss_axis.plot(epochs, row["epoch_loss"], marker=".", label=label)
        accuracy_axis.plot(epochs, [100 * value for value in row["epoch_accuracy"]], marker=".",
                           color=line.get_color(), label=label)
    name = f"{document.get('dataset', '?')}, {document.get('world', '?')} ranks"
    _axes(loss_axis, "epoch", "training loss (mean over the epoch)", f"loss, {name}", logx=False, logy=True)
    _axes(accuracy_axis, "epoch", "test accuracy (%)", f"accuracy, {name}", logx=False)
    from matplotlib.ticker import MaxNLocator

    for axis in (loss_axis, accuracy_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def _time_to_accuracy(figure: Any, document: Document) -> None:
    """``sparsecoll-bench train``'s rows: test accuracy against training wall-clock (left) and
    against steps (right), each row's curve, with the target accuracy as a line."""
    from matplotlib import colormaps

    time_axis, step_axis = figure.subplots(1, 2)
    target = document.get("target_accuracy")
    rows = [row for row in document["rows"] if row.get("curve")]
    colors = colormaps["tab20"].colors
    for number, row in enumerate(rows):
        steps, seconds, accuracy = zip(*row["curve"])
        density = "" if row.get("density", 1.0) >= 1.0 else f" {100 * row['density']:g}%"
        label = f"{row.get('run', row.get('algorithm', '?'))}{density}"
        torch_baseline = row.get("method") in ("ddp", "fp16", "powersgd")
        style = {"color": colors[number % len(colors)], "linestyle": "--" if torch_baseline else "-",
                 "marker": "." if torch_baseline else "o", "markersize": 3, "linewidth": 1.2, "label": label}
        time_axis.plot(seconds, [100 * value for value in accuracy], **style)
        step_axis.plot(steps, [100 * value for value in accuracy], **style)
    link = document.get("link") or "loopback"
    name = f"{document.get('model', '?')}, {document.get('world', '?')} ranks, {link}"
    for axis in (time_axis, step_axis):
        if target is not None:
            axis.axhline(100 * target, color="0.3", linestyle="--", linewidth=1, label="target")
        low = 100 * target - 6 if target is not None else None
        if low is not None:
            axis.set_ylim(bottom=low)
    _axes(time_axis, "training seconds (evaluation excluded)", "test accuracy (%)",
          f"time to accuracy, {name}", logx=False)
    _axes(step_axis, "step", "test accuracy (%)", f"accuracy per step, {name}", logx=False)


def _axes(axis: Any, xlabel: str | None, ylabel: str, title: str, *, logx: bool = True,
          logy: bool = False) -> None:
    if logx:
        from matplotlib.ticker import FuncFormatter

        axis.set_xscale("log", base=2)
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: format_size(round(value))))
    if logy:
        axis.set_yscale("log")
    if xlabel:
        axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.grid(True, which="major", alpha=0.3)
    axis.legend(fontsize=7)


_DRAWERS: dict[str, Callable[[Any, Document], None]] = {
    "collectives": _collectives, "sparse": _sparse, "kernels": _kernels, "train": _train,
}
