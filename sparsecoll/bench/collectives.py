"""Collective benchmark in nccl-tests' terms, against torch.distributed Gloo in the same run.

Each rank runs the same list of cases (op, algorithm, size, density, quantization); for every
case it times ``iterations`` calls, keeps the slowest rank's times (a collective is done when
its last rank is), counts the bytes it sent in one call and checks the result: dense ops
against their closed-form answer, sparse reductions against numpy's sum of every rank's
contribution (:func:`sparsecoll.bench.sparse.count_wrong`). Gloo's time for the same op and
size is the baseline of every row. Bus bandwidth uses nccl-tests' factors: allreduce
2(P-1)/P, allgather (P-1)/P, broadcast 1; a sparse reduction of a gradient of ``size`` bytes
counts as an allreduce of it, so its busbw is what a dense allreduce would need to match it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

import sparsecoll
from sparsecoll.bench import checks
from sparsecoll.bench.common import format_size
from sparsecoll.bench.ranks import RankPlace
from sparsecoll.bench.table import Column, binary_size, count, integer, microseconds, nbytes, number, percent, speedup
from sparsecoll.bench.sparse import SPARSE_ALGORITHMS, heavy_tailed, reduces, time_sparse
from sparsecoll.collectives.sparse_common import resolve_k
from sparsecoll.errors import InvalidArgumentError

OPS = checks.OPS
ALGORITHMS = ("dense", "gloo", *SPARSE_ALGORITHMS)
"""``gloo`` adds the Gloo baseline to every row; the sparse ones reduce an allreduce's gradient."""
BUS_FACTORS = {
    "allreduce": lambda p: 2 * (p - 1) / p,
    "allgather": lambda p: (p - 1) / p,
    "broadcast": lambda p: 1.0,
}
COLUMNS = [
    ("size", "size"), ("count", "count"), ("op", "op"), ("algorithm", "algorithm"),
    ("density", "density"), ("k", "k"), ("bits", "bits"), ("time_us", "time (us)"), ("min_us", "min (us)"),
    ("algbw", "algbw GB/s"), ("busbw", "busbw GB/s"), ("bytes_sent", "wire B/rank"), ("wrong", "#wrong"),
    ("gloo_time_us", "gloo (us)"), ("gloo_busbw", "gloo busbw"), ("ratio", "x faster than gloo"),
]
TABLE = [
    Column("size", "size", binary_size, constant=True), Column("count", "count", count, default=False),
    Column("op", "op", constant=True), Column("algorithm", "algorithm", constant=True),
    Column("setting", "density", constant=True), Column("density", "density", percent, default=False),
    Column("k", "k", count, default=False), Column("bits", "bits", integer, default=False),
    Column("time_us", "time", microseconds),
    Column("min_us", "min", microseconds, default=False), Column("algbw", "algbw GB/s", number, default=False),
    Column("busbw", "busbw GB/s", number), Column("bytes_sent", "wire/rank", nbytes),
    Column("wrong", "wrong", integer), Column("gloo_time_us", "Gloo", microseconds, default=False),
    Column("gloo_busbw", "Gloo busbw", number, default=False), Column("ratio", "vs Gloo", speedup),
]
"""The terminal table: the short default columns fit 80 columns; ``--wide`` shows them all.
``setting`` is the density with the bits, e.g. "1% 8b" (see :func:`table_rows`)."""


def table_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with their ``setting`` for the table: the density and, when quantized, the bits."""
    return [dict(row, setting=None if row.get("density") is None else
                 percent(row["density"]) + (f" {row['bits']}b" if row.get("bits") else "")) for row in rows]


class Case(NamedTuple):
    """One row of the sweep: a dense op, or a sparse reduction with its density and bits."""

    op: str
    algorithm: str
    nbytes: int
    density: float | None = None
    bits: int | None = None


def plan_cases(ops: Sequence[str], algorithms: Sequence[str], sizes: Sequence[int],
               densities: Sequence[float], bits: Sequence[int | None]) -> list[Case]:
    """Every case in table order: op, then algorithm and its (density, bits), then size.

    Algorithms apply to allreduce; the other ops always run our dense implementation.
    """
    unknown = sorted(set(ops) - set(OPS)) + sorted(name for name in set(algorithms)
                                                   if name not in ALGORITHMS and not reduces(name))
    if unknown:
        raise InvalidArgumentError(f"unknown op or algorithm {', '.join(unknown)}; ops: {', '.join(OPS)}; "
                                   f"algorithms: {', '.join(ALGORITHMS)}")
    cases = []
    for op in ops:
        chosen = [name for name in algorithms if name != "gloo"] if op == "allreduce" else ["dense"]
        for algorithm in chosen:
            configs = [(None, None)] if algorithm == "dense" else [(d, b) for d in densities for b in bits]
            cases += [Case(op, algorithm, nbytes, density, bit) for density, bit in configs for nbytes in sizes]
    if not cases:
        raise InvalidArgumentError("nothing to time: give an op and, for allreduce, an algorithm besides gloo")
    return cases


def iterations_for(nbytes: int, requested: int | None) -> int:
    """Enough calls to average out noise without spending minutes on the largest sizes."""
    if requested:
        return requested
    return int(min(200, max(5, (256 << 20) // max(nbytes, 1) // 8)))


async def run_rank(rank: int, world: int, place: RankPlace, cases: Sequence[Case], iterations: int | None,
                   warmup: int, with_gloo: bool, progress: bool) -> list[dict]:
    """The sweep as seen by one rank; rows are complete (slowest-rank times) on every rank."""
    import torch.distributed as dist

    store = place.enter(rank, world)
    if with_gloo:
        dist.init_process_group("gloo", store=dist.PrefixStore("gloo", store), rank=rank, world_size=world)
    rows = []
    gloo_times: dict[tuple[str, int], np.ndarray] = {}
    grads: dict[int, np.ndarray] = {}
    bar = _progress(rank == 0 and progress, len(cases) + 1)
    async with await sparsecoll.init_group(store=store, rank=rank, world_size=world, timeout=600) as group:
        bar.begin("compiling kernels")
        await _preflight(group, cases)
        bar.advance()
        for case in cases:
            bar.begin(f"{case.op} {case.algorithm} {format_size(case.nbytes)}")
            rows.append(await _run_case(group, case, iterations, warmup, dist if with_gloo else None, gloo_times,
                                        grads))
            bar.advance()
    bar.stop()
    if with_gloo:
        dist.destroy_process_group()
    return rows


async def _preflight(group: sparsecoll.Group, cases: Sequence[Case]) -> None:
    """One small call of every sparse configuration: compiles the kernels before any timing,
    and an option an algorithm refuses fails here rather than deep into the sweep."""
    grad = heavy_tailed(group.rank, 4096)
    for algorithm, density, bits in sorted({(c.algorithm, c.density, c.bits) for c in cases
                                            if c.algorithm != "dense"}, key=str):
        await group.reduce_gradient(grad, algorithm, density=density, quantize_bits=bits)


async def _run_case(group: sparsecoll.Group, case: Case, iterations: int | None, warmup: int, dist: Any,
                    gloo_times: dict[tuple[str, int], np.ndarray], grads: dict[int, np.ndarray]) -> dict[str, Any]:
    """One case's row; ``gloo_times`` keeps Gloo's times per (op, count) and ``grads`` this rank's
    gradient per count (a Student-t draw as large as the case, the same every time), each made
    once per sweep."""
    world = group.size
    count = max(1, case.nbytes // 4)
    if case.op == "allgather":
        count = max(1, count // world)
    size = count * 4 * (world if case.op == "allgather" else 1)
    repeat = iterations_for(size, iterations)
    row: dict[str, Any] = {"size": size, "count": count, "type": "float32", "op": case.op,
                           "algorithm": case.algorithm, "density": case.density, "bits": case.bits,
                           "ranks": world, "iterations": repeat}
    if case.algorithm == "dense":
        times, wrong, sent = await _time_dense(group, case.op, count, repeat, warmup)
    else:
        row["k"] = resolve_k(count, None, case.density)
        if count not in grads:
            grads[count] = heavy_tailed(group.rank, count)
        # a copy, so that an algorithm that wrote into its input could not change a later case's data
        times, sent, wrong = await time_sparse(group, grads[count].copy(), case.algorithm, case.density, case.bits,
                                               repeat, warmup)
    baseline_key = (case.op, count)
    fresh_baseline = dist is not None and baseline_key not in gloo_times
    if fresh_baseline:
        times = np.concatenate([times, _time_gloo(dist, case.op, count, repeat, warmup, world)])
    slowest, _ = await group.allreduce(times, op="max")
    wrong_total, _ = await group.allreduce(np.array([wrong], np.int64))
    if fresh_baseline:
        gloo_times[baseline_key] = slowest[repeat:]
    row.update(_bandwidth(size, slowest[:repeat], case.op, world))
    row.update(wrong=int(wrong_total[0]), bytes_sent=sent)
    if dist is not None:
        gloo = _bandwidth(size, gloo_times[baseline_key], case.op, world)
        row.update(gloo_time_us=gloo["time_us"], gloo_busbw=gloo["busbw"], ratio=gloo["time_us"] / row["time_us"])
    return row


def _bandwidth(nbytes: int, times: np.ndarray, op: str, world: int) -> dict[str, float]:
    average = float(np.mean(times))
    algbw = nbytes / average / 1e9 if op != "barrier" else 0.0
    return {"time_us": average * 1e6, "min_us": float(np.min(times)) * 1e6, "algbw": algbw,
            "busbw": algbw * BUS_FACTORS.get(op, lambda p: 0.0)(world)}


async def _time_dense(group: sparsecoll.Group, op: str, count: int, repeat: int,
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
    else:
        out, expected = None, None
        call = group.barrier
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


def _time_gloo(dist: Any, op: str, count: int, repeat: int, warmup: int, world: int) -> np.ndarray:
    import torch

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
    def begin(self, description: str) -> None:
        pass

    def advance(self) -> None:
        pass

    def stop(self) -> None:
        pass


class _Progress:
    def __init__(self, total: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), transient=True)
        self._task = self._progress.add_task("starting", total=total)
        self._progress.start()

    def begin(self, description: str) -> None:
        self._progress.update(self._task, description=description)

    def advance(self) -> None:
        self._progress.advance(self._task)

    def stop(self) -> None:
        self._progress.stop()


def _progress(enabled: bool, total: int) -> _Progress | _NoProgress:
    return _Progress(total) if enabled else _NoProgress()
