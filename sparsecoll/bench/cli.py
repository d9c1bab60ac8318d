"""``sparsecoll-bench``: benchmarks of collectives, kernels and training, nccl-tests style.

``--ranks N`` spawns N local ranks; under torchrun (or anything that sets RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT) each process runs its own rank and rank 0 prints, so the same
command measures a real network across hosts. ``--link 1gbit`` puts spawned ranks in network
namespaces joined by tbf-shaped links (root only; created and always removed by the command).
``--json FILE`` writes the rows with the machine and date, ``--plot FILE.png`` draws them.
"""

from __future__ import annotations

from typing import Annotated

import typer

from sparsecoll.bench import checks, model_cli, train_cli
from sparsecoll.bench.cli_support import (
    Backend,
    Density,
    Imports,
    JsonFile,
    Link,
    PlotFile,
    QuantizeBits,
    Ranks,
    RanksPerHost,
    Wide,
    clean_errors,
    console,
    errors,
    report,
    save,
    starting,
    status,
)
from sparsecoll.bench.common import parse_count, parse_size, size_sweep
from sparsecoll.bench.ranks import (
    import_plugins,
    run_ranks,
    this_rank,
    under_launcher,
    world_size,
)
from sparsecoll.bench.table import render

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Benchmarks of sparsecoll's collectives, kernels and training.")


def _version(show: bool) -> None:
    if show:
        from sparsecoll import __version__

        print(f"sparsecoll-bench (sparsecoll) {__version__}")
        raise typer.Exit()


@app.callback()
def main(imports: Imports = None,
         version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="print the version and exit")] = False) -> None:
    """Options for every subcommand (--import also works after the subcommand)."""
    with clean_errors():
        import_plugins(imports or [])


def _sweep(ranks: int, cases: list, iterations: int | None, warmup: int, with_gloo: bool, backend: str,
           link: str | None, json_file: str | None, plot_file: str | None, title: str, wide: bool,
           ranks_per_host: int = 1) -> None:
    from sparsecoll.bench import collectives

    starting(world_size(ranks))
    rank, rows = run_ranks(ranks, collectives.run_rank, cases, iterations, warmup, with_gloo,
                           console.is_terminal, backend=backend, link=link, ranks_per_host=ranks_per_host)
    if rank != 0:
        return
    world = rows[0]["ranks"]
    where = f"{backend.upper()}, {link + ' links' if link else 'loopback'}"
    shown = collectives.table_rows(rows)
    for op in dict.fromkeys(row["op"] for row in rows):  # one table per op, as nccl-tests prints them
        render(f"{title}: {world} ranks, {where}", collectives.TABLE, [row for row in shown if row["op"] == op],
               console, wide=wide)
    save("collectives", rows, json_file, plot_file, ranks=world, backend=backend, link=link or "loopback")


@app.command(short_help="4 ranks, a ResNet-50's gradient: dense and Gloo vs gTop-k and CLT-k")
def demo(
    ranks: Ranks = 4,
    link: Annotated[str | None, typer.Option(metavar="RATE", help="emulated links of this rate, e.g. 1gbit (root "
                                                                  "and tc tbf), or loopback (default: 1gbit links "
                                                                  "where this machine can build them, else "
                                                                  "loopback)")] = None,
    size: Annotated[str, typer.Option("--size", "-d", metavar="COUNT", help="gradient elements (25M: a "
                                                                            "ResNet-50's)")] = "25M",
    iterations: Annotated[int, typer.Option("--iters", "-n", metavar="N", help="timed calls per algorithm "
                                                                              "(after one untimed)")] = 2,
    json_file: JsonFile = None,
    plot_file: PlotFile = None,
    wide: Wide = False,
    imports: Imports = None,
) -> None:
    """The README's first command: dense allreduce (ours and Gloo's) against gTop-k and CLT-k at 0.1%
    on one gradient, over emulated 1 Gbit/s links where the machine allows, and the ratio in a sentence."""
    with clean_errors():
        import_plugins(imports or [])
        checks.positive("--ranks", ranks)
        elements = checks.positive("--size", parse_count(size))
        checks.positive("--iters", iterations)
        from sparsecoll.bench.demo import DENSITY, LOOPBACK, TABLE, choose_where, conclusion, run_demo

        where = choose_where(link)
        if where.fallback is not None:
            errors.print(f"running on loopback: {where.fallback}", markup=False)
        rows = run_demo(world_size(ranks), elements, iterations, where)
    if this_rank() != 0:
        return
    place = f"{where.link} links" if where.link else "torchrun's network" if under_launcher() else LOOPBACK
    sentence = conclusion(rows, where)
    report("sparse", f"demo over {place}", TABLE, rows, json_file, plot_file, wide,
           command="demo", link=where.link or LOOPBACK, density=DENSITY, backend="tcp", conclusion=sentence)
    console.print(sentence, highlight=False, soft_wrap=True)  # one line in logs; a terminal wraps it


@app.command("collectives", short_help="nccl-tests style size sweep vs Gloo")
def collectives_command(
    ranks: Ranks = 4,
    begin: Annotated[str, typer.Option("--minbytes", "-b", metavar="SIZE", help="smallest size, e.g. 1K")] = "1K",
    end: Annotated[str, typer.Option("--maxbytes", "-e", metavar="SIZE", help="largest size, e.g. 256M")] = "64M",
    factor: Annotated[int, typer.Option("--stepfactor", "-f", metavar="N", help="size multiplier")] = 2,
    iterations: Annotated[int, typer.Option("--iters", "-n", metavar="N", help="timed calls per size "
                                                                              "(0: automatic)")] = 0,
    warmup: Annotated[int, typer.Option("--warmup-iters", "-w", metavar="N", help="untimed calls first")] = 3,
    warmup_underscore: Annotated[int | None, typer.Option("--warmup_iters", hidden=True)] = None,
    ops: Annotated[str, typer.Option(metavar="LIST", help="comma-separated: allreduce,allgather,broadcast,"
                                                          "barrier")] = "allreduce",
    algorithms: Annotated[str, typer.Option(metavar="LIST", help="for allreduce, comma-separated: dense, gloo "
                                                                 "(the baseline of every row), allgather, gtopk, "
                                                                 "sketch, cltk, oktopk or a registered name")] = "dense,gloo",
    density: Density = "0.01",
    quantize_bits: QuantizeBits = "0",
    backend: Backend = "tcp",
    link: Link = None,
    ranks_per_host: RanksPerHost = 1,
    json_file: JsonFile = None,
    plot_file: PlotFile = None,
    wide: Wide = False,
    imports: Imports = None,
) -> None:
    """Sweep sizes like nccl-tests (-b -e -f -n -w); sizes are bytes of float32 data."""
    with clean_errors():
        import_plugins(imports or [])
        checks.positive("--ranks", ranks)
        checks.positive("--iters", iterations, least=0)
        warmup = checks.positive("--warmup-iters", warmup if warmup_underscore is None else warmup_underscore,
                                 least=0)
        names = checks.algorithms("--algorithms", algorithms, ("dense", "gloo"))
        unknown_ops = [op for op in checks.listed("--ops", ops) if op not in checks.OPS]
        if unknown_ops:
            raise ValueError(f"--ops: unknown {', '.join(unknown_ops)}; choose from {', '.join(checks.OPS)}")
        bits = checks.quantize_bits("--quantize-bits", quantize_bits)
        smallest, largest = checks.positive("--minbytes", parse_size(begin)), parse_size(end)
        if largest < smallest:
            raise ValueError(f"--maxbytes {end} is smaller than --minbytes {begin}")
        sizes = size_sweep(smallest, largest, checks.positive("--stepfactor", factor, least=2))
        densities = checks.densities("--density", density)
        checks.backend(backend)
        checks.link(link)
        from sparsecoll.bench import collectives  # after the checks: it loads the kernels

        cases = collectives.plan_cases(checks.listed("--ops", ops), names, sizes, densities, bits)
        checks.ranks_per_host(ranks_per_host, [ranks])
        _sweep(ranks, cases, iterations or None, warmup, "gloo" in names, backend, link, json_file, plot_file,
               "sparsecoll collectives", wide, ranks_per_host)


@app.command("soak", short_help="many small allreduces: leaks and errors")
def soak_command(ranks: Ranks = 4,
                 iterations: Annotated[int, typer.Option("--iters", "-n", metavar="N",
                                                         help="allreduces of 8 bytes per rank")] = 10_000,
                 backend: Backend = "tcp",
                 json_file: JsonFile = None,
                 wide: Wide = False,
                 imports: Imports = None) -> None:
    """Many small allreduces; resident memory and open descriptors before and after."""
    from sparsecoll.bench import soak
    from sparsecoll.bench.ranks import with_group

    with clean_errors():
        import_plugins(imports or [])
        checks.positive("--ranks", ranks)
        checks.positive("--iters", iterations)
        checks.backend(backend)
        starting(world_size(ranks))
        with status(f"{iterations:,} allreduces on each of {world_size(ranks)} ranks..."):
            rank, rows = run_ranks(ranks, with_group, soak.run_rank, iterations, backend=backend, every_rank=True)
    if rank == 0:
        report("soak", f"soak: {iterations:,} allreduces of 8 bytes", soak.TABLE, rows, json_file, None, wide)


@app.command("sparse", short_help="every algorithm at one gradient size")
def sparse_command(
    ranks: Annotated[str, typer.Option("--ranks", "-r", metavar="LIST", help="rank counts, e.g. 4 or 2,4,8")] = "4",
    size: Annotated[str, typer.Option("--size", "-d", metavar="COUNT", help="gradient elements, e.g. 25M")] = "1M",
    density: Annotated[float, typer.Option(metavar="FRACTION", help="fraction of elements sent (0.001 is "
                                                                    "0.1%)")] = 0.001,
    iterations: Annotated[int, typer.Option("--iters", "-n", metavar="N", help="timed calls per algorithm "
                                                                              "(after one untimed)")] = 3,
    algorithms: Annotated[str, typer.Option(metavar="LIST", help="comma-separated: dense, gloo, allgather, gtopk, "
                                                                 "sketch, cltk, oktopk, selection (the local top-k "
                                                                 "alone) "
                                                                 "or a registered name")] =
        "dense,gloo,allgather,gtopk,sketch,cltk,oktopk,selection",
    backend: Backend = "tcp",
    link: Link = None,
    ranks_per_host: RanksPerHost = 1,
    hierarchical: Annotated[str, typer.Option(metavar="off|on|both", help="dense, allgather, gtopk and cltk flat "
                                                                          "(off), in two levels (on), or "
                                                                          "both")] = "off",
    auto: Annotated[bool, typer.Option(help="also show what algorithm='auto' would pick (calibrated cost "
                                            "model, else defaults) against the fastest measured")] = True,
    json_file: JsonFile = None,
    plot_file: PlotFile = None,
    wide: Wide = False,
    imports: Imports = None,
) -> None:
    """Dense vs sparse collectives end to end at one gradient size, over several rank counts."""
    with clean_errors():
        import_plugins(imports or [])
        elements = checks.positive("--size", parse_count(size))
        checks.densities("--density", str(density))
        checks.positive("--iters", iterations)
        names = checks.algorithms("--algorithms", algorithms, ("dense", "gloo", "selection"))
        worlds = [world_size(0)] if under_launcher() else [checks.positive("--ranks", value)
                                                            for value in checks.listed("--ranks", ranks, int)]
        checks.backend(backend)
        checks.link(link)
        checks.ranks_per_host(ranks_per_host, worlds)
        if hierarchical not in ("off", "on", "both"):
            raise ValueError(f"--hierarchical must be off, on or both, not {hierarchical!r}")
        from sparsecoll.bench import sparse  # after the checks: it loads the kernels

        rank, rows = 0, []
        for world in worlds:
            starting(world)
            with status(f"{world} ranks: {', '.join(names)} at d={size}..."):
                rank, world_rows = run_ranks(world, sparse.run_rank, elements, density, names, iterations,
                                             ranks_per_host, hierarchical, backend=backend, link=link,
                                             ranks_per_host=ranks_per_host)
            rows += world_rows
    if rank != 0:
        return
    where = f"{backend.upper()}, {link + ' links' if link else 'loopback'}" + (
        f", hosts of {ranks_per_host} ranks" if ranks_per_host > 1 else "")
    report("sparse", f"sparse vs dense, density {100 * density:g}%, {where}", sparse.TABLE, rows, json_file,
            plot_file, wide, link=link or "loopback", density=density, backend=backend)
    if auto:
        _auto_report(rows, json_file, link, wide)


def _auto_report(rows: list[dict], json_file: str | None, link: str | None, wide: bool) -> None:
    """How far "auto"'s pick was from the fastest measured, priced by the model the ranks' own
    group used (the calibration file's, else the one it measured online)."""
    import numpy as np

    from sparsecoll.bench import sparse
    from sparsecoll.collectives.cost_model import CostModel, auto_gap, default_path

    path = default_path()
    source = path if path.exists() else "no calibration file: calibrated online"
    gaps = []
    for world in sorted({row["ranks"] for row in rows}):
        chosen = [row for row in rows if row["ranks"] == world]
        gaps += auto_gap(chosen, CostModel.from_array(np.array(chosen[0]["auto_model"])))
    if gaps:
        auto_json = json_file and json_file.removesuffix(".json") + "-auto.json"
        report("auto", f"algorithm='auto' against the fastest measured ({source})", sparse.AUTO_TABLE, gaps,
                auto_json, None, wide, model=str(source), link=link or "loopback")


@app.command("kernels", short_help="top-k, quantize, sketch vs torch.topk")
def kernels_command(
    sizes: Annotated[str, typer.Option(metavar="LIST", help="vector sizes, e.g. 1M,25M,100M")] = "1M,25M,100M",
    densities: Annotated[str, typer.Option(metavar="LIST", help="selection densities, e.g. 0.01,0.001")]
        = "0.01,0.001",
    repeats: Annotated[int, typer.Option(metavar="N", help="timed runs per kernel (best kept)")] = 3,
    throughput: Annotated[bool, typer.Option(help="also count-sketch and quantization throughput (25M)")] = True,
    jit: Annotated[bool, typer.Option(help="also import and first-call (JIT) time in fresh processes")] = True,
    json_file: JsonFile = None,
    plot_file: PlotFile = None,
    wide: Wide = False,
    imports: Imports = None,
) -> None:
    """Selection, quantization and sketch kernels against torch.topk and numpy baselines."""
    with clean_errors():
        import_plugins(imports or [])
        chosen_sizes = checks.counts("--sizes", sizes)
        chosen_densities = checks.densities("--densities", densities)
        checks.positive("--repeats", repeats)
        from sparsecoll.bench import kernels

        with status(f"timing kernels at {sizes}..."):
            rows = kernels.run_kernel_bench(chosen_sizes, chosen_densities, repeats=repeats, sketch=throughput,
                                            quantize=throughput, jit=jit)
    kernels.print_table(rows, console, wide=wide)
    save("kernels", rows, json_file, plot_file)


app.command("train", short_help="time to accuracy vs DDP, fp16 and PowerSGD")(train_cli.train_command)
app.command("model", short_help="the cost model's time and bytes, P = 2..1024")(model_cli.model_command)


@app.command("calibrate", short_help="measure the cost model \"auto\" uses")
def calibrate_command(
    ranks: Annotated[int, typer.Option("--ranks", "-r", metavar="N", help="local ranks to spawn, at least 2 "
                                                                         "(ignored under torchrun)")] = 4,
    link: Link = None,
    output: Annotated[str | None, typer.Option("--output", "-o", metavar="FILE", help="model file (default: "
                                               "$SPARSECOLL_COST_MODEL or ~/.cache/sparsecoll/cost_model.json)")]
        = None,
    json_file: JsonFile = None,
    imports: Imports = None,
) -> None:
    """Measure latency, bandwidth and kernel costs, and save the cost model algorithm="auto" uses."""
    with clean_errors():
        import_plugins(imports or [])
        if not under_launcher():
            checks.positive("--ranks", ranks, least=2)
        checks.link(link)
        from sparsecoll.bench import calibrate  # after the checks: it loads the kernels

        starting(world_size(ranks))
        with status("measuring latency, bandwidth and kernels..."):
            model = calibrate.calibrate(ranks, link, output)
    if this_rank() != 0:
        return
    calibrate.print_model(model, console, output)
    if json_file:
        import dataclasses

        save("calibrate", [dataclasses.asdict(model)], json_file, None)


if __name__ == "__main__":
    app()
