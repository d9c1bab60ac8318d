"""``sparsecoll-bench``: microbenchmarks of collectives and kernels, nccl-tests style.

``--ranks N`` spawns N local ranks; under torchrun (or anything that sets RANK, WORLD_SIZE
and MASTER_ADDR) each process runs its own rank and rank 0 prints, so the same command
measures a real network across hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from typing import Annotated, Any

import typer
from rich.console import Console

from sparsecoll.bench import collectives, soak, sparse
from sparsecoll.bench.common import format_size, parse_count, parse_size, render_table, size_sweep, write_json
from sparsecoll.launch import spawn

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Benchmarks of sparsecoll's collectives and kernels.")
console = Console()
if not console.is_terminal:
    console = Console(width=180)  # full tables in logs and pipes

Ranks = Annotated[int, typer.Option("--ranks", "-r", help="local ranks to spawn (ignored under torchrun)")]
JsonFile = Annotated[str | None, typer.Option("--json", help="also write the rows to this JSON file")]


def _under_launcher() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _run_everywhere(ranks: int, target: Any, *args: Any, with_group: bool) -> tuple[int, Any]:
    """Run ``target`` on every rank; returns (this process's rank or 0, rank 0's result)."""
    group_kwargs = {} if with_group else None
    if _under_launcher():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

        async def one_rank() -> Any:
            if not with_group:
                return await target(rank, world, *args)
            import sparsecoll

            async with await sparsecoll.init_group() as group:
                return await target(group, *args)

        return rank, asyncio.run(one_rank())
    results = spawn(ranks, target, *args, group_kwargs=group_kwargs, timeout=3600)
    failures = [result for result in results if isinstance(result, Exception)]
    if failures:
        raise failures[0]
    return 0, results if with_group else results[0]


def _collectives(ranks: int, ops: list[str], sizes: list[int], iterations: int | None, warmup: int,
                 gloo: bool, json_file: str | None, title: str) -> None:
    rank, rows = _run_everywhere(ranks, collectives.run_rank, ops, sizes, iterations, warmup,
                                 gloo, console.is_terminal, with_group=False)
    if rank != 0:
        return
    for row in rows:
        row["size"] = format_size(row["size"]) if isinstance(row["size"], int) else row["size"]
    columns = [c for c in collectives.COLUMNS if gloo or not c[0].startswith(("gloo", "ratio"))]
    render_table(f"{title}: {rows[0]['ranks']} ranks", columns, rows, console)
    if json_file:
        write_json(json_file, "collectives", rows, ranks=rows[0]["ranks"], backend="tcp")
        console.print(f"wrote {json_file}")


@app.command()
def demo(ranks: Ranks = 4) -> None:
    """The README's first command: local ranks run the dense collectives against Gloo."""
    _collectives(ranks, ["allreduce", "allgather", "broadcast"], [8, 64 << 10, 4 << 20], None, 3,
                 True, None, "sparsecoll demo (TCP, loopback) vs torch.distributed Gloo")


@app.command("collectives")
def collectives_command(
    ranks: Ranks = 4,
    begin: Annotated[str, typer.Option("--minbytes", "-b", help="smallest size, e.g. 1K")] = "1K",
    end: Annotated[str, typer.Option("--maxbytes", "-e", help="largest size, e.g. 64M")] = "64M",
    factor: Annotated[int, typer.Option("--stepfactor", "-f", help="size multiplier")] = 2,
    iterations: Annotated[int, typer.Option("--iters", "-n", help="calls per size (0: automatic)")] = 0,
    warmup: Annotated[int, typer.Option("--warmup_iters", "-w", help="untimed calls first")] = 3,
    ops: Annotated[str, typer.Option(help="comma-separated: allreduce,allgather,broadcast,barrier")] = "allreduce",
    gloo: Annotated[bool, typer.Option(help="time torch.distributed Gloo in the same run")] = True,
    json_file: JsonFile = None,
) -> None:
    """Sweep sizes like nccl-tests (-b -e -f -n -w) for the dense collectives."""
    sizes = size_sweep(parse_size(begin), parse_size(end), factor)
    _collectives(ranks, ops.split(","), sizes, iterations or None, warmup, gloo, json_file,
                 "sparsecoll collectives (TCP)")


@app.command("soak")
def soak_command(ranks: Ranks = 4,
                 iterations: Annotated[int, typer.Option("--iters", "-n")] = 10_000,
                 json_file: JsonFile = None) -> None:
    """Many small allreduces; resident memory and open descriptors before and after."""
    rank, rows = _run_everywhere(ranks, soak.run_rank, iterations, with_group=True)
    if rank != 0:
        return
    rows = rows if isinstance(rows, list) else [rows]
    render_table(f"soak: {iterations} allreduces of 8 bytes", soak.COLUMNS, rows, console)
    if json_file:
        write_json(json_file, "soak", rows)


@app.command("sparse")
def sparse_command(
    ranks: Annotated[str, typer.Option("--ranks", "-r", help="rank counts, e.g. 4 or 2,4,8")] = "4",
    size: Annotated[str, typer.Option("--size", "-d", help="gradient elements, e.g. 25M")] = "1M",
    density: Annotated[float, typer.Option(help="fraction of elements sent")] = 0.001,
    iterations: Annotated[int, typer.Option("--iters", "-n")] = 3,
    algorithms: Annotated[str, typer.Option(help="comma-separated")] = ",".join(sparse.ALGORITHMS),
    link: Annotated[str | None, typer.Option(help="emulate links of this rate, e.g. 1gbit (root)")] = None,
    json_file: JsonFile = None,
) -> None:
    """Dense vs sparse collectives end to end, optionally over tbf-shaped namespace links."""
    elements = parse_count(size)
    rows = []
    for world in [int(value) for value in ranks.split(",")]:
        rows += _sparse_run(world, elements, density, iterations, algorithms.split(","), link)
    title = f"sparse vs dense, d={size}, density {density}" + (f", {link} links" if link else ", loopback")
    render_table(title, sparse.COLUMNS, rows, console)
    if json_file:
        write_json(json_file, "sparse", rows, link=link or "loopback", density=density)
        console.print(f"wrote {json_file}")


def _sparse_run(world: int, elements: int, density: float, iterations: int, algorithms: list[str],
                link: str | None) -> list[dict]:
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        network = None
        if link:
            from sparsecoll.bench.netem import EmulatedNetwork

            net = stack.enter_context(EmulatedNetwork(world, link))
            network = {"namespaces": [net.namespace(r) for r in range(world)],
                       "addresses": [net.address(r) for r in range(world)],
                       "interfaces": [net.interface(r) for r in range(world)]}
        results = spawn(world, sparse.run_rank, elements, density, algorithms, iterations, network,
                        os.path.join(scratch, "store"), timeout=3600)
    failures = [result for result in results if isinstance(result, Exception)]
    if failures:
        raise failures[0]
    return results[0]


@app.command("kernels")
def kernels_command(json_file: JsonFile = None) -> None:
    """Selection, quantization and sketch kernels against torch.topk and numpy baselines."""
    from sparsecoll.bench import kernels

    rows = kernels.run_kernel_bench()
    kernels.print_table(rows)
    if json_file:
        write_json(json_file, "kernels", rows)


if __name__ == "__main__":
    app()
