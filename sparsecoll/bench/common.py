"""Shared pieces of the benchmarks: size parsing, machine facts, JSON and tables."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'8', '1K', '64M', '1G' (powers of 1024) to bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGB]?)\s*(I?B)?\s*", text.upper())
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 8, 1K, 64M)")
    return int(match.group(1)) * _UNITS[match.group(2)]


def parse_count(text: str) -> int:
    """Element counts in decimal units: '25M' is 25,000,000 (a ResNet-50 gradient), '1K' 1,000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)\s*", text.upper())
    if not match:
        raise ValueError(f"not a count: {text!r} (examples: 1000, 1M, 25M)")
    return int(float(match.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[match.group(2)])


def format_size(nbytes: int) -> str:
    """Bytes as nccl-tests prints them in its first column, but human-readable."""
    for unit, factor in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= factor and nbytes % factor == 0:
            return f"{nbytes // factor}{unit}"
    return str(nbytes)


def size_sweep(begin: int, end: int, factor: int) -> list[int]:
    """begin, begin*factor, ... up to end, like nccl-tests' -b -e -f."""
    if begin <= 0 or end < begin or factor < 2:
        raise ValueError("need 0 < begin <= end and factor >= 2")
    sizes = []
    size = begin
    while size <= end:
        sizes.append(size)
        size *= factor
    return sizes


def machine() -> dict[str, Any]:
    """Where and when a number was measured; every report carries it."""
    import numpy
    import torch

    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def make_document(kind: str, rows: Sequence[dict], **extra: Any) -> dict[str, Any]:
    """One benchmark run: what, where, when, and the rows (what JSON files and plots hold)."""
    return {"benchmark": kind, "machine": machine(), **extra, "rows": list(rows)}


def write_json(path: str | Path, kind: str, rows: Sequence[dict], **extra: Any) -> dict[str, Any]:
    """Write one benchmark run as JSON (see :func:`make_document`); returns the document."""
    document = make_document(kind, rows, **extra)
    save_json(path, document)
    return document


def save_json(path: str | Path, document: dict[str, Any]) -> None:
    """Write a benchmark document, creating its directory."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(document, indent=2))


def parse_list(text: str, parse: Callable[[str], Any] = str) -> list[Any]:
    """'a,b,c' to a list, each item parsed; empty items are skipped."""
    return [parse(item.strip()) for item in text.split(",") if item.strip()]


ColumnT = TypeVar("ColumnT", bound=tuple)


def present_columns(columns: Sequence[ColumnT], rows: Sequence[dict]) -> list[ColumnT]:
    """The columns (tuples that start with the row key) that hold a value in at least one row
    (no all-empty columns in a table)."""
    return [column for column in columns if any(row.get(column[0]) is not None for row in rows)]


def render_table(title: str, columns: Sequence[tuple[str, str]], rows: Sequence[dict],
                 console: Console | None = None) -> None:
    """Print rows as a rich table; ``columns`` are (key, header) pairs."""
    table = Table(title=title, header_style="bold")
    for _key, header in columns:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*(_cell(row.get(key)) for key, _header in columns))
    (console or Console()).print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
