"""Render benchmark JSON (from ``sparsecoll-bench ... --json``) as the README's markdown tables.

    python tools/report.py bench-results/sparse-1gbit.json          # print the tables
    python tools/report.py --readme README.md bench-results/run      # rewrite the README section

With ``--readme``, every JSON file of the run directory (as ``tools/run_benchmarks.sh`` writes
it) becomes a heading, a table, the machine and date its numbers came from, and its plot (the
PNG of the same name, copied to ``--images``, by default ``docs/bench`` beside the README).
Only the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` is replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsecoll.bench.common import present_columns

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
ORDER = ("collectives", "sparse", "kernels", "train", "soak")
Column = tuple[str, str, Callable[[Any], str] | None]


def _size(value: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= factor and value % factor == 0:
            return f"{value // factor} {unit}"
    return f"{value} B"


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _density(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:g}%"


def _times(value: float) -> str:
    return f"{value:.3g}x" if value < 100 else f"{value:,.0f}x"


TABLES: dict[str, list[Column]] = {
    "collectives": [("size", "size", _size), ("op", "op", None), ("algorithm", "algorithm", None),
                    ("density", "density", _density), ("bits", "bits", None), ("time_us", "time (us)", None),
                    ("min_us", "min (us)", None), ("algbw", "algbw GB/s", None), ("busbw", "busbw GB/s", None),
                    ("bytes_sent", "bytes/rank", None), ("gloo_time_us", "Gloo (us)", None),
                    ("ratio", "x faster than Gloo", _times), ("wrong", "#wrong", None)],
    "sparse": [("ranks", "P", None), ("algorithm", "algorithm", None), ("time_ms", "time (ms)", None),
               ("bytes_sent", "bytes/rank", None), ("formula_bytes", "formula", None),
               ("speedup_vs_gloo", "x faster than Gloo dense", _times), ("wrong", "#wrong", None)],
    "kernels": [("size", "d", None), ("density", "density", _density), ("torch_topk_ms", "torch.topk (ms)", None),
                ("argpartition_ms", "argpartition (ms)", None), ("fast_ms", "fast (ms)", None),
                ("exact_ms", "exact (ms)", None), ("fast_vs_torch", "fast vs torch.topk", _times),
                ("exact_vs_torch", "exact vs torch.topk", _times), ("threshold_vs_abs", "threshold / abs pass", None),
                ("correct", "correct", None)],
    "train": [("algorithm", "algorithm", None), ("density", "density", _density),
              ("error_feedback", "error feedback", None), ("accuracy", "test accuracy", _percent),
              ("final_loss", "train loss", None), ("steady_bytes_per_step", "bytes/step/rank", None),
              ("compression", "compression", _times), ("seconds_per_step", "time/step (ms)", lambda s: f"{1e3 * s:.3g}")],
    "kernels-gpu": [("size", "d", None), ("density", "density", _density), ("torch_topk_ms", "torch.topk CUDA (ms)", None),
                    ("fast_ms", "fast CUDA (ms)", None), ("exact_ms", "exact CUDA (ms)", None),
                    ("fast_vs_torch", "fast vs torch.topk", _times), ("exact_vs_torch", "exact vs torch.topk", _times),
                    ("correct", "correct", None)],
    "auto": [("ranks", "P", None), ("d", "d", None), ("k", "k", None), ("pick", "auto's pick", None),
             ("predicted_ms", "predicted (ms)", None), ("pick_ms", "measured (ms)", None),
             ("best", "fastest measured", None), ("best_ms", "fastest (ms)", None),
             ("gap_pct", "gap", lambda value: f"{value:.1f}%")],
    "soak": [("rank", "rank", None), ("iterations", "calls", None), ("errors", "errors", None),
             ("rss_growth_pct", "RSS +%", None), ("fds_before", "fds before", None), ("fds_after", "fds after", None)],
}


def _cell(value: object, format_value: Callable[[Any], str] | None = None) -> str:
    if value is None:
        return "-"
    if format_value is not None:
        return format_value(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and abs(value) >= 1000:
        return f"{value:,}"
    return str(value)


def table(rows: list[dict], columns: list[Column]) -> str:
    """Rows as a markdown table; columns no row has a value for are left out."""
    columns = present_columns(columns, rows)
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in columns) + " |" for row in rows]
    return "\n".join(lines)


def provenance(document: dict) -> str:
    """The machine and date the numbers came from, as an italic line."""
    machine = document.get("machine") or {}
    return (f"_Measured {machine.get('date', '(date unknown)')} on {machine.get('host', '(host unknown)')}: "
            f"{machine.get('cpus', '?')} CPUs ({machine.get('processor', '?')}), Python {machine.get('python', '?')}, "
            f"numpy {machine.get('numpy', '?')}, torch {machine.get('torch', '?')}._")


def heading(document: dict) -> str:
    """A bold one-line title from what the document says about its run."""
    kind, rows = document["benchmark"], document["rows"]
    link = document.get("link") or "loopback"
    where = "loopback" if link == "loopback" else f"{link} emulated links"
    if kind == "collectives":
        algorithms = ", ".join(dict.fromkeys(row.get("algorithm", "dense") for row in rows))
        return (f"Collectives: {document.get('ranks', '?')} ranks, {document.get('backend', 'tcp').upper()} over "
                f"{where}; {algorithms}")
    if kind == "sparse":
        worlds = ", ".join(str(world) for world in dict.fromkeys(row["ranks"] for row in rows))
        return (f"Sparse vs dense: d = {rows[0]['d']:,} float32, density {_density(document.get('density'))}, "
                f"P = {worlds}, {where}")
    if kind == "auto":
        model = Path(document.get("model", "default model")).name
        return f"algorithm=\"auto\" against the fastest measured, {where} (cost model: {model})"
    if kind == "kernels":
        return "Kernels: top-k selection, float32, CPU"
    if kind == "train":
        return (f"Training: {document.get('dataset', '?')}, {document.get('world', '?')} ranks, "
                f"{document.get('epochs', '?')} epochs")
    return kind.capitalize()


def markdown(document: dict) -> str:
    """One benchmark document as markdown: table(s) and the provenance line."""
    kind, rows = document["benchmark"], document["rows"]
    if kind == "kernels":
        parts = [table([row for row in rows if row.get("kind") == "selection"], TABLES["kernels"])]
        on_gpu = [row for row in rows if row.get("kind") == "selection-gpu"]
        if on_gpu:
            parts.append(table(on_gpu, TABLES["kernels-gpu"]))
        others = [_kernel_line(row) for row in rows if row.get("kind") not in ("selection", "selection-gpu")]
        if others:
            parts.append("\n".join(f"- {line}" for line in others))
        body = "\n\n".join(parts)
    else:
        body = table(rows, TABLES.get(kind) or [(key, key, None) for key in rows[0]])
    return f"{body}\n\n{provenance(document)}"


def _kernel_line(row: dict) -> str:
    if row["kind"] == "sketch":
        return f"count-sketch insert, {row['size']:,} into {row['rows']} x {row['columns']:,}: {row['gbps']:.2f} GB/s"
    if row["kind"] == "quantize":
        return (f"quantize {row['size']:,} float32 to {row['bits']} bits: {row['quantize_gbps']:.2f} GB/s "
                f"(dequantize {row['dequantize_gbps']:.2f} GB/s)")
    if row["kind"] == "jit":
        return f"import + first calls, {row['cache']}: {row['import_s']:.2f} s + {row['first_calls_s']:.2f} s"
    return json.dumps(row)


def section(run_dir: Path, images: Path, readme_dir: Path) -> str:
    """The generated README section for every JSON file of a run directory."""
    documents = []
    for path in sorted(run_dir.glob("*.json")):
        document = json.loads(path.read_text())
        if "benchmark" in document and document.get("rows"):
            documents.append((path, document))
    if not documents:
        raise SystemExit(f"no benchmark JSON with rows in {run_dir}")
    # an auto table follows the sparse table it was computed from
    documents.sort(key=lambda item: (_rank(item[1]["benchmark"]), _natural(item[0].stem.removesuffix("-auto")),
                                     item[0].stem.endswith("-auto")))
    parts = [f"<!-- generated by tools/report.py from {run_dir.name}; edit the run, not this text -->"]
    for path, document in documents:
        parts.append(f"**{heading(document)}** (`{path.name}`)\n\n{markdown(document)}")
        plot = path.with_suffix(".png")
        if plot.exists():
            images.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(plot, images / plot.name)
            link = Path(os.path.relpath(images / plot.name, readme_dir)).as_posix()
            parts.append(f"![{heading(document)}]({link})")
    return "\n\n".join(parts)


def _natural(name: str) -> list:
    """Sort key that puts 1gbit before 10gbit."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _rank(kind: str) -> int:
    kind = "sparse" if kind == "auto" else kind
    return ORDER.index(kind) if kind in ORDER else len(ORDER)


def check_markers(text: str) -> None:
    """Refuse a README without exactly one begin marker followed by one end marker."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.find(END) < text.find(BEGIN):
        raise SystemExit(f"the README needs exactly one {BEGIN} followed by one {END}")


def replace_section(text: str, generated: str) -> str:
    """``text`` with what lies between the bench markers replaced by ``generated``."""
    check_markers(text)
    start, end = text.find(BEGIN) + len(BEGIN), text.find(END)
    return f"{text[:start]}\n{generated}\n{text[end:]}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="JSON files to print, or with --readme one run directory")
    parser.add_argument("--readme", type=Path, help="rewrite this README's bench section from a run directory")
    parser.add_argument("--images", type=Path, help="where plots are copied (default: docs/bench beside the README)")
    args = parser.parse_args(argv)
    if args.readme is None:
        for path in args.paths:
            document = json.loads(Path(path).read_text())
            print(f"**{heading(document)}**\n\n{markdown(document)}\n")
        return
    if len(args.paths) != 1 or not Path(args.paths[0]).is_dir():
        parser.error("--readme takes one run directory (what tools/run_benchmarks.sh writes)")
    text = args.readme.read_text()
    check_markers(text)
    readme_dir = args.readme.resolve().parent
    images = args.images or readme_dir / "docs" / "bench"
    generated = section(Path(args.paths[0]), images, readme_dir)
    args.readme.write_text(replace_section(text, generated))
    print(f"rewrote the bench section of {args.readme}", file=sys.stderr)


if __name__ == "__main__":
    main()
