"""Transport benchmark: allreduce over UCX vs our TCP vs torch.distributed Gloo, one run.

``python -m sparsecoll.bench.transports`` spawns 2 and 4 local ranks per transport, sweeps
allreduce sizes like nccl-tests (slowest rank's mean time, algbw, busbw, a correctness column,
via :mod:`sparsecoll.bench.collectives`), measures small-message latency with an 8-byte
ping-pong, and prints busbw ratios taken from the same run. Gloo is timed inside the TCP run.
Loopback numbers on a shared machine are noisy: compare ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import datetime
import time
from typing import Any

import numpy as np
from rich.console import Console

import sparsecoll
from sparsecoll.bench import collectives
from sparsecoll.bench.common import (
    format_size,
    parse_size,
    render_table,
    size_sweep,
    write_json,
)
from sparsecoll.bench.ranks import RankPlace, raise_rank_error
from sparsecoll.launch import spawn

TRANSPORTS: dict[str, dict[str, str]] = {
    "tcp": {"SPARSECOLL_BACKEND": "tcp"},
    "ucx-tcp": {"SPARSECOLL_BACKEND": "ucx", "UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"},
    "ucx-sm": {"SPARSECOLL_BACKEND": "ucx", "UCX_TLS": "sm,tcp", "UCX_NET_DEVICES": "lo"},
}
"""Name -> environment of its ranks. ``ucx-sm`` lets UCX move payloads between local ranks
through shared memory (a payload endpoint over posix/sysv; headers stay on the TCP endpoint)."""
PING_PONGS = 2000


async def sweep_rank(rank: int, world: int, sizes: list[int], warmup: int, with_gloo: bool,
                     name: str) -> dict[str, Any]:
    """One rank: the allreduce sweep (with Gloo if asked), then an 8-byte ping-pong 0 <-> 1."""
    cases = collectives.plan_cases(["allreduce"], ["dense"], sizes, [], [None])
    rows = await collectives.run_rank(rank, world, RankPlace(), cases, None, warmup, with_gloo, False)
    store = RankPlace().enter(rank, world)
    latency: dict[str, float] = {}
    async with await sparsecoll.init_group(store=store, rank=rank, world_size=world, name=f"pp-{name}") as group:
        latency["ours_us"] = await _ping_pong(group)
    if with_gloo:
        latency["gloo_us"] = _gloo_ping_pong(store, rank, world)
    return {"rows": rows, "latency": latency}


async def _ping_pong(group: sparsecoll.Group) -> float:
    """Half the round-trip time of an 8-byte message between ranks 0 and 1, microseconds."""
    message = np.zeros(1, np.float64)
    times = []
    for iteration in range(PING_PONGS + 100):
        started = time.perf_counter()
        if group.rank == 0:
            await group.send(message, 1)
            await group.recv(1, out=message)
        elif group.rank == 1:
            await group.recv(0, out=message)
            await group.send(message, 0)
        if iteration >= 100:
            times.append(time.perf_counter() - started)
    await group.barrier()
    return float(np.median(times)) / 2 * 1e6


def _gloo_ping_pong(store: Any, rank: int, world: int) -> float:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.PrefixStore("gloo-pp", store), rank=rank, world_size=world)
    message = torch.zeros(1, dtype=torch.float64)
    times = []
    for iteration in range(PING_PONGS + 100):
        started = time.perf_counter()
        if rank == 0:
            dist.send(message, 1)
            dist.recv(message, 1)
        elif rank == 1:
            dist.recv(message, 0)
            dist.send(message, 0)
        if iteration >= 100:
            times.append(time.perf_counter() - started)
    dist.barrier()
    dist.destroy_process_group()
    return float(np.median(times)) / 2 * 1e6


def run(ranks: list[int], sizes: list[int], transports: list[str], warmup: int) -> tuple[list[dict], list[dict]]:
    """Every transport at every rank count; returns (sweep rows, latency rows)."""
    rows, latencies = [], []
    for world in ranks:
        by_transport: dict[str, dict] = {}
        for name in transports:
            with_gloo = name == "tcp"
            result = raise_rank_error(spawn(world, sweep_rank, sizes, warmup, with_gloo, name, timeout=3600,
                                            env=TRANSPORTS[name]))[0]
            by_transport[name] = result
            latencies.append({"ranks": world, "transport": name, "latency_us": result["latency"]["ours_us"]})
            if with_gloo:
                latencies.append({"ranks": world, "transport": "gloo", "latency_us": result["latency"]["gloo_us"]})
        rows.extend(_merge(world, sizes, by_transport))
    return rows, latencies


def _merge(world: int, sizes: list[int], by_transport: dict[str, dict]) -> list[dict]:
    merged = []
    for index, size in enumerate(sizes):
        row: dict[str, Any] = {"ranks": world, "size": size, "count": size // 4, "wrong": 0}
        for name, result in by_transport.items():
            source = result["rows"][index]
            row[f"{name}_us"] = source["time_us"]
            row[f"{name}_algbw"] = source["algbw"]
            row[f"{name}_busbw"] = source["busbw"]
            row["wrong"] += source["wrong"]
            if "gloo_busbw" in source:
                row["gloo_us"], row["gloo_busbw"] = source["gloo_time_us"], source["gloo_busbw"]
        for name in by_transport:
            if name.startswith("ucx"):
                if "tcp_busbw" in row:
                    row[f"{name}/tcp"] = row[f"{name}_busbw"] / row["tcp_busbw"]
                if "gloo_busbw" in row:
                    row[f"{name}/gloo"] = row[f"{name}_busbw"] / row["gloo_busbw"]
        merged.append(row)
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("-b", "--begin", default="1K")
    parser.add_argument("-e", "--end", default="256M")
    parser.add_argument("-f", "--factor", type=int, default=4)
    parser.add_argument("-w", "--warmup", type=int, default=2)
    parser.add_argument("--transports", nargs="+", default=list(TRANSPORTS), choices=list(TRANSPORTS))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    parser.add_argument("--json", default=f"bench-results/transports-{stamp}.json")
    options = parser.parse_args(argv)
    transports = ["tcp", *(name for name in options.transports if name != "tcp")]
    sizes = size_sweep(parse_size(options.begin), parse_size(options.end), options.factor)
    rows, latencies = run(options.ranks, sizes, transports, options.warmup)
    columns = [("size", "size"), ("count", "count")]
    for name in transports:
        columns += [(f"{name}_us", f"{name} (us)"), (f"{name}_busbw", f"{name} busbw")]
    columns += [("gloo_us", "gloo (us)"), ("gloo_busbw", "gloo busbw")]
    columns += [(f"{name}/{base}", f"{name}/{base}") for name in transports if name.startswith("ucx")
                for base in ("tcp", "gloo")]
    columns.append(("wrong", "#wrong"))
    console = Console() if Console().is_terminal else Console(width=240)
    for world in options.ranks:
        shown = [dict(row, size=format_size(row["size"])) for row in rows if row["ranks"] == world]
        render_table(f"allreduce float32, {world} ranks (busbw GB/s)", columns, shown, console)
    render_table("8-byte ping-pong, half round trip", [("ranks", "ranks"), ("transport", "transport"),
                                                      ("latency_us", "latency (us)")], latencies, console)
    write_json(options.json, "transports", rows, latency=latencies, transports=
               {name: TRANSPORTS[name] for name in transports})
    print(f"wrote {options.json}")


if __name__ == "__main__":
    main()
