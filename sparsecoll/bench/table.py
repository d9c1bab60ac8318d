"""Terminal tables of the benchmarks: a short default set of columns that fits 80 columns, every
column with ``--wide``, numbers in K/M/G units, densities as percentages, and speed ratios said
in words ("1.9x faster", "1.1x slower"). Cells are never cut: a cell that does not fit wraps
(the default columns are chosen so that none has to). JSON keeps every raw value; this is only the view.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table


def count(value: float) -> str:
    """Decimal K/M/G with 3 significant digits: 25,000,000 -> '25M', 1049 -> '1.05K'."""
    for unit, factor in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{unit}"
    return f"{value:.3g}" if isinstance(value, float) and not float(value).is_integer() else f"{int(value)}"


def nbytes(value: float) -> str:
    """Bytes in decimal units: 1,573,248 -> '1.57MB', 600 -> '600B'."""
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{unit}"
    return f"{int(value)}B"


def binary_size(value: int) -> str:
    """A power-of-two message size as nccl-tests sweeps them: 65536 -> '64K'."""
    for unit, factor in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value >= factor and value % factor == 0:
            return f"{value // factor}{unit}"
    return nbytes(value)


def percent(value: float) -> str:
    """A fraction as a percentage: 0.001 -> '0.1%', 1.0 -> '100%'."""
    return f"{100 * value:.3g}%"


def seconds(value: float) -> str:
    """Seconds in the unit that keeps 3 significant digits readable: '876us', '13.5ms', '1.32s'."""
    for unit, factor in (("s", 1.0), ("ms", 1e-3)):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{unit}"
    return f"{value * 1e6:.3g}us"


def microseconds(value: float) -> str:
    return seconds(value * 1e-6)


def milliseconds(value: float) -> str:
    return seconds(value * 1e-3)


def speedup(ratio: float) -> str:
    """How many times faster (ratio > 1) or slower (< 1) than the baseline, in words."""
    if not math.isfinite(ratio) or ratio <= 0:
        return "-"
    times = ratio if ratio >= 1 else 1 / ratio
    text = f"{times:.2f}" if times < 1.1 else f"{times:.1f}" if times < 10 else f"{times:,.0f}"
    if text == "1.00":
        return "same"
    return f"{text}x {'faster' if ratio >= 1 else 'slower'}"


def number(value: float) -> str:
    """A measured figure, 3 significant digits (thousands separated above 1000)."""
    if value == 0:
        return "0"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def integer(value: float) -> str:
    return f"{int(value):,}"


@dataclass(frozen=True)
class Column:
    """A table column: the row key, its header, how a value reads, and whether the short table
    shows it (``default``). A ``constant`` column whose value is the same in every row moves
    into the title instead of repeating down the table."""

    key: str
    header: str
    render: Callable[[Any], str] = str
    default: bool = True
    constant: bool = False


def cell(column: Column, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str | bool):
        return str(value)
    return column.render(value)


def render(title: str, columns: Sequence[Column], rows: Sequence[dict], console: Console, *,
           wide: bool = False) -> None:
    """Print ``rows``: the default columns (every column with ``wide``) that hold a value."""
    chosen = [column for column in columns if (wide or column.default)
              and any(row.get(column.key) is not None for row in rows)]
    if rows and not wide:
        same = [column for column in chosen if column.constant
                and len({cell(column, row.get(column.key)) for row in rows}) == 1]
        if same:
            title += " (" + ", ".join(f"{c.header} {cell(c, rows[0].get(c.key))}" for c in same) + ")"
            chosen = [column for column in chosen if column not in same]
    table = Table(title=title, header_style="bold", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False,
                  collapse_padding=True)
    for column in chosen:
        table.add_column(column.header, justify="right", overflow="fold")  # wrap rather than cut, if ever
    for row in rows:
        table.add_row(*(cell(column, row.get(column.key)) for column in chosen))
    console.print(table)
