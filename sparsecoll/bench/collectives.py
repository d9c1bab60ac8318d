"""Dense collective benchmark in nccl-tests' terms, against torch.distributed Gloo in the same run.

Each rank runs the same sweep; for every (op, size) it times ``iterations`` calls of ours and
of Gloo's, keeps the slowest rank's average (a collective is done when its last rank is), and
checks the result against the closed-form answer. Bus bandwidth uses nccl-tests' factors:
allreduce 2(P-1)/P, allgather (P-1)/P, broadcast 1.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

import sparsecoll

BUS_FACTORS = {
    "allreduce": lambda p: 2 * (p - 1) / p,
    "allgather": lambda p: (p - 1) / p,
    "broadcast": lambda p: 1.0,
}
COLUMNS = [
    ("size", "size"), ("count", "count"), ("type", "type"), ("op", "op"),
    ("time_us", "time (us)"), ("min_us", "min (us)"), ("algbw", "algbw GB/s"),
    ("busbw", "busbw GB/s"), ("bytes_sent", "wire B/rank"), ("wrong", "#wrong"),
    ("gloo_time_us", "gloo (us)"), ("gloo_busbw", "gloo busbw"), ("ratio", "busbw ours/gloo"),
]


def iterations_for(nbytes: int, requested: int | None) -> int:
    """Enough calls to average out noise without spending minutes on the largest sizes."""
    if requested:
        return requested
    return int(min(200, max(5, (256 << 20) // max(nbytes, 1) // 8)))


def _store_client(world: int):
    from torch.distributed import TCPStore

    return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False)


async def run_rank(rank: int, world: int, ops: Sequence[str], sizes: Sequence[int],
                   iterations: int | None, warmup: int, with_gloo: bool, progress: bool) -> list[dict]:
    """The sweep as seen by one rank; rows are complete (slowest-rank times) on every rank."""
    import torch
    import torch.distributed as dist

    store = _store_client(world)
    if with_gloo:
        dist.init_process_group("gloo", store=dist.PrefixStore("gloo", store), rank=rank, world_size=world)
    rows = []
    cases = [(op, size) for op in ops for size in sizes]
    bar = _progress(rank == 0 and progress, len(cases))
    async with await sparsecoll.init_group(store=store, rank=rank, world_size=world) as group:
        for op, nbytes in cases:
            count = max(1, nbytes // 4)
            if op == "allgather":
                count = max(1, count // world)
            repeat = iterations_for(nbytes, iterations)
            row: dict[str, Any] = {"size": count * 4 * (world if op == "allgather" else 1),
                                   "count": count, "type": "float32", "op": op, "ranks": world,
                                   "iterations": repeat}
            times, wrong, sent = await _time_ours(group, op, count, repeat, warmup)
            if with_gloo:
                gloo_times = _time_gloo(dist, torch, op, count, repeat, warmup, world)
                times = np.concatenate([times, gloo_times])
            slowest, _ = await group.allreduce(times, op="max")
            wrong_total, _ = await group.allreduce(np.array([wrong], np.int64))
            ours_times = slowest[:repeat]
            row.update(_bandwidth(row["size"], ours_times, op, world))
            row.update(wrong=int(wrong_total[0]), bytes_sent=sent)
            if with_gloo:
                gloo = _bandwidth(row["size"], slowest[repeat:], op, world)
                row.update(gloo_time_us=gloo["time_us"], gloo_busbw=gloo["busbw"])
                row["ratio"] = row["busbw"] / gloo["busbw"] if op != "barrier" else gloo["time_us"] / row["time_us"]
            rows.append(row)
            bar.advance()
    bar.stop()
    if with_gloo:
        dist.destroy_process_group()
    return rows


def _bandwidth(nbytes: int, times: np.ndarray, op: str, world: int) -> dict[str, float]:
    average = float(np.mean(times))
    algbw = nbytes / average / 1e9 if op != "barrier" else 0.0
    return {"time_us": average * 1e6, "min_us": float(np.min(times)) * 1e6, "algbw": algbw,
            "busbw": algbw * BUS_FACTORS.get(op, lambda p: 0.0)(world)}


async def _time_ours(group: sparsecoll.Group, op: str, count: int, repeat: int,
                     warmup: int) -> tuple[np.ndarray, int, int]:
    rank, world = group.rank, group.size
    data = np.full(count, rank + 1, np.float32)
    if op == "allreduce":
        out = np.empty_like(data)
        call, expected = (lambda: group.allreduce(data, out=out)), world * (world + 1) / 2
    elif op == "allgather":
        out = np.empty((world, count), np.float32)
        call, expected = (lambda: group.allgather(data, out=out)), None
    elif op == "broadcast":
        out = np.empty_like(data)
        call, expected = (lambda: group.broadcast(data, 0, out=out)), 1.0
    elif op == "barrier":
        out, expected = None, None
        call = group.barrier
    else:
        raise ValueError(f"unknown op {op!r}")
    for _ in range(warmup):
        await call()
    times = np.empty(repeat)
    for index in range(repeat):
        started = time.perf_counter()
        _, stats = await call()
        times[index] = time.perf_counter() - started
    if op == "allgather":
        wrong = int(np.count_nonzero(out != np.arange(1, world + 1, dtype=np.float32)[:, None]))
    elif expected is not None:
        wrong = int(np.count_nonzero(out != expected))
    else:
        wrong = 0
    return times, wrong, stats.bytes_sent


def _time_gloo(dist: Any, torch: Any, op: str, count: int, repeat: int, warmup: int, world: int) -> np.ndarray:
    tensor = torch.zeros(count)
    if op == "allreduce":
        def call(): dist.all_reduce(tensor)
    elif op == "allgather":
        gathered = torch.empty(world * count)

        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

        def call(): gather(gathered, tensor)
    elif op == "broadcast":
        def call(): dist.broadcast(tensor, 0)
    else:
        def call(): dist.barrier()
    for _ in range(warmup):
        call()
    times = np.empty(repeat)
    for index in range(repeat):
        started = time.perf_counter()
        call()
        times[index] = time.perf_counter() - started
    return times


class _NoProgress:
    def advance(self) -> None:
        pass

    def stop(self) -> None:
        pass


class _Progress:
    def __init__(self, total: int) -> None:
        from rich.progress import Progress

        self._progress = Progress(transient=True)
        self._task = self._progress.add_task("benchmarking", total=total)
        self._progress.start()

    def advance(self) -> None:
        self._progress.advance(self._task)

    def stop(self) -> None:
        self._progress.stop()


def _progress(enabled: bool, total: int) -> _Progress | _NoProgress:
    return _Progress(total) if enabled else _NoProgress()
