"""What every ``sparsecoll-bench`` subcommand shares: its option types, the consoles, one-line
errors, the status line while ranks work, and the table-then-JSON-then-plot report."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from sparsecoll.bench.common import make_document, save_json
from sparsecoll.bench.ranks import BACKENDS, under_launcher
from sparsecoll.bench.table import Column, render
from sparsecoll.errors import SparseCollError

console = Console()
if not console.is_terminal and "COLUMNS" not in os.environ:
    console = Console(width=200)  # full tables in logs and pipes
errors = Console(stderr=True, highlight=False, soft_wrap=True)

Imports = Annotated[list[str] | None, typer.Option(
    "--import", metavar="MODULE", help="a module that registers collectives or compressors (every rank "
                                       "imports it); its names then work in --algorithms; repeatable")]
Ranks = Annotated[int, typer.Option("--ranks", "-r", metavar="N", help="local ranks to spawn (ignored under torchrun)")]
JsonFile = Annotated[str | None, typer.Option("--json", metavar="FILE", help="also write every row and field "
                                                                              "to this JSON file")]
PlotFile = Annotated[str | None, typer.Option("--plot", metavar="FILE.png", help="also draw the rows to this PNG file")]
Wide = Annotated[bool, typer.Option("--wide", help="every column (the default table fits 80 columns)")]
Backend = Annotated[str, typer.Option(metavar="NAME", help=f"transport: {' or '.join(BACKENDS)} (ucx: UCX over TCP "
                                                          "on loopback unless UCX_TLS/UCX_NET_DEVICES are set)")]
Link = Annotated[str | None, typer.Option(metavar="RATE", help="emulated links of this rate per rank, e.g. 1gbit "
                                                               "or 10gbit, and a one-way delay, e.g. 1gbit,5ms "
                                                               "(netem; root only)")]
RanksPerHost = Annotated[int, typer.Option("--ranks-per-host", metavar="L", help="emulated hosts of L ranks each "
                                                                                "(one namespace a host with --link; "
                                                                                "SPARSECOLL_HOST_ID)")]
Density = Annotated[str, typer.Option("--density", metavar="LIST", help="fractions of the gradient sent, "
                                                                        "e.g. 0.01,0.001 (0.01 is 1%)")]
QuantizeBits = Annotated[str, typer.Option("--quantize-bits", metavar="LIST", help="bits per sent value: 0 (not "
                                                                                   "quantized), 1, 2, 4 or 8; e.g. 0,8")]


@contextlib.contextmanager
def clean_errors() -> Iterator[None]:
    """A wrong option, a missing privilege or a collective's refusal: one line, exit status 2."""
    try:
        yield
    except (SparseCollError, PermissionError, FileNotFoundError, ValueError) as error:
        message = error.message if isinstance(error, SparseCollError) and error.rank is None else str(error)
        errors.print(f"[bold red]error:[/] {escape(message)}")  # "[rank 0]" is text, not markup
        raise typer.Exit(2) from None


def status(message: str) -> contextlib.AbstractContextManager:
    """A spinner with ``message`` on a terminal while the ranks work (nothing in pipes and logs)."""
    if console.is_terminal and not under_launcher():
        return console.status(message)
    return contextlib.nullcontext()


def starting(ranks: int) -> None:
    if not under_launcher():
        console.print(f"[dim]starting {ranks} ranks (imports and kernel compilation take a few seconds)...[/]")


def report(kind: str, title: str, columns: Sequence[Column], rows: list[dict], json_file: str | None,
            plot_file: str | None, wide: bool, **extra: Any) -> None:
    """Print the table, then write the JSON and the plot when asked."""
    render(title, columns, rows, console, wide=wide)
    save(kind, rows, json_file, plot_file, **extra)


def save(kind: str, rows: list[dict], json_file: str | None, plot_file: str | None, **extra: Any) -> None:
    document = make_document(kind, rows, **extra)
    if json_file:
        save_json(json_file, document)
        console.print(f"wrote {json_file}")
    if plot_file:
        from sparsecoll.bench.plots import plot_document

        plot_document(document, plot_file)
        console.print(f"wrote {plot_file}")
