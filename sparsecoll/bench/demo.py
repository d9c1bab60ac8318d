"""``sparsecoll-bench demo``: the point of sparsecoll in one table and one sentence.

Four ranks reduce a ResNet-50-sized gradient (25M float32) with our dense ring allreduce,
torch.distributed Gloo's allreduce, gTop-k and CLT-k at 0.1%, over emulated 1 Gbit/s links
where this machine can build them (root, and a kernel that lets ``tc`` shape a veth with tbf),
else on loopback, which has no bandwidth limit and so cannot show what the sparse algorithms
save; the last line says which, with the ratio against Gloo measured in the same run.

1. :func:`choose_where`: an explicit ``--link`` is obeyed (or refused in one line); without one
   the demo probes the machine (:func:`~sparsecoll.bench.netem.shaping_problem`) and falls
   back to loopback, saying why.
2. :func:`run_demo` spawns the ranks (on their links) and draws a progress bar on stderr from
   what rank 0 reports through a queue.
3. :func:`run_rank`, on every rank: draw a heavy-tailed gradient, then per algorithm one
   untimed call and ``iterations`` timed ones; every row keeps the slowest rank's times and
   counts wrong entries (dense against Gloo's sum, sparse ones as ``sparse.count_wrong`` does).
4. :func:`conclusion`: the sentence.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import queue
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparsecoll.bench.ranks import RankPlace, run_ranks, under_launcher
from sparsecoll.bench.table import Column, count, integer, milliseconds, nbytes, speedup
from sparsecoll.errors import InvalidArgumentError

RESNET50_ELEMENTS = 25_000_000
"""A ResNet-50's gradient, in float32 elements (25.6M parameters)."""
DEFAULT_RATE = "1gbit"
DENSITY = 0.001
ALGORITHMS = ("dense", "gloo", "gtopk", "cltk")
LABELS = {"dense": "dense ring allreduce", "gloo": "Gloo allreduce", "gtopk": "gTop-k at 0.1%",
          "cltk": "CLT-k at 0.1%"}
LOOPBACK = "loopback"
KERNEL_WAIT_S = 300.0
"""How long ranks wait for the parent's first compilation of the kernels before compiling them."""
TABLE = [
    Column("ranks", "P", integer, constant=True), Column("d", "d", count, constant=True),
    Column("k", "k", count, constant=True), Column("label", "algorithm"), Column("time_ms", "time", milliseconds),
    Column("min_ms", "min", milliseconds, default=False), Column("bytes_sent", "wire/rank", nbytes),
    Column("formula_bytes", "formula", nbytes, default=False), Column("speedup_vs_gloo", "vs Gloo", speedup),
    Column("wrong", "wrong", integer),
]
"""The rows are ``sparse``'s (its JSON and plot); this view names the algorithms in words."""


@dataclass(frozen=True)
class Where:
    """Where the ranks run: ``link`` is tc's rate of the emulated links, or None (loopback, or
    the launcher's network under torchrun); ``fallback`` says why loopback when the demo chose
    it for want of emulated links."""

    link: str | None
    fallback: str | None = None


def choose_where(requested: str | None) -> Where:
    """1gbit links where this machine can build them, else loopback; an explicit request
    (a rate, or ``loopback``) is obeyed, and a rate this machine cannot give is refused."""
    from sparsecoll.bench import checks
    from sparsecoll.bench.netem import shaping_problem

    if under_launcher():
        if requested not in (None, LOOPBACK):
            checks.link(requested)  # a rate: refused under torchrun by run_ranks, in one line
        return Where(requested if requested != LOOPBACK else None)
    if requested == LOOPBACK:
        return Where(None)
    if requested is not None:
        checks.link(requested)  # the rate's syntax, and root
    problem = shaping_problem()
    if requested is not None and problem is not None:
        raise InvalidArgumentError(problem)  # asked for links: refused before anything starts
    if requested is not None:
        return Where(requested)
    return Where(DEFAULT_RATE) if problem is None else Where(None, problem)


def run_demo(ranks: int, size: int, iterations: int, where: Where) -> list[dict[str, Any]]:
    """Rows of every algorithm (slowest-rank times, bytes, wrong entries, ratio against Gloo);
    the progress bar runs on stderr meanwhile. Under torchrun this process is one rank."""
    phases = len(ALGORITHMS) + 2
    if under_launcher():
        _, rows = run_ranks(ranks, run_rank, size, iterations, None, None, link=where.link)
        return rows
    bar = PhaseBar(phases)
    bar.next(f"starting {ranks} rank{'s' if ranks != 1 else ''}")
    context = multiprocessing.get_context("spawn")
    reports, compiled = context.Queue(), context.Event()
    done = threading.Event()
    follower = threading.Thread(target=_follow, args=(reports, bar, done), daemon=True)
    follower.start()
    with concurrent.futures.ThreadPoolExecutor(1) as compiler:
        compiling = compiler.submit(compile_kernels, compiled)
        try:
            _, rows = run_ranks(ranks, run_rank, size, iterations, reports, compiled, link=where.link)
        finally:
            done.set()
            follower.join()
            bar.stop()
            reports.close()
        compiling.result()
    bar.close()
    return rows


def compile_kernels(compiled: Any) -> None:
    """Compile gTop-k's and CLT-k's selection and merge kernels into Numba's cache once, in the
    parent while the ranks start, then set ``compiled`` (also on failure: the ranks then compile
    themselves). On a first run the ranks would otherwise each compile them (about 8 s of CPU
    each, four times over on the same cores); with a warm cache this only loads them."""
    try:
        from sparsecoll import kernels
        from sparsecoll.collectives.gtopk import merge_top

        size = 1 << 17  # above the fast path's floor, as a real gradient is
        k = size // 1000
        rng = np.random.default_rng(0)
        mine, theirs = (kernels.topk(rng.standard_normal(size, np.float32), k, method="fast") for _ in range(2))
        merge_top(mine, theirs, k)
    finally:
        compiled.set()


def _follow(reports: Any, bar: PhaseBar, done: threading.Event) -> None:
    """Move the bar to each phase rank 0 reports, until the run is over."""
    while True:
        try:
            bar.next(reports.get(timeout=0.1))
        except queue.Empty:
            if done.is_set():
                return


async def run_rank(rank: int, world: int, place: RankPlace, size: int, iterations: int, reports: Any,
                   compiled: Any) -> list[dict[str, Any]]:
    """One rank of the demo; returns complete rows (slowest-rank times) on every rank.
    ``reports`` is the parent's progress queue and ``compiled`` the event it sets once the
    kernels are in Numba's cache (both None under torchrun: rank 0 draws the bar, and every
    rank compiles what its cache lacks)."""
    import torch
    import torch.distributed as dist

    import sparsecoll
    from sparsecoll.bench.sparse import formula_bytes, heavy_tailed, time_sparse
    from sparsecoll.collectives.sparse_common import resolve_k

    store = place.enter(rank, world)
    report = _reporter(rank, reports)
    dist.init_process_group("gloo", store=dist.PrefixStore("gloo", store), rank=rank, world_size=world)
    k = resolve_k(size, None, DENSITY)
    rows = []
    async with await sparsecoll.init_group(store=store, rank=rank, world_size=world, timeout=600) as group:
        report(f"drawing a {size:,}-element gradient on each rank")
        grad = heavy_tailed(rank, size)
        dense_sum = np.empty_like(grad)
        for algorithm in ALGORITHMS:
            waiting = compiled is not None and algorithm not in ("dense", "gloo") and not compiled.is_set()
            report(f"{LABELS[algorithm]}: {iterations + 1} calls" + (" once the kernels compile" if waiting else ""))
            if algorithm == "dense":
                times, sent = await _time_dense(group, grad, dense_sum, iterations)
                wrong = 0
            elif algorithm == "gloo":
                gloo_sum = torch.empty(size)
                times, sent, wrong = _time_gloo(dist, torch.from_numpy(grad), gloo_sum, iterations), None, 0
            else:
                if waiting:
                    compiled.wait(KERNEL_WAIT_S)  # then loaded from the cache, not compiled once more here
                times, sent, wrong = await time_sparse(group, grad, algorithm, DENSITY, None, iterations, 1)
            slowest, _ = await group.allreduce(times, op="max")
            wrong_total, _ = await group.allreduce(np.array([wrong], np.int64))
            rows.append({"ranks": world, "d": size, "k": k, "algorithm": algorithm, "label": LABELS[algorithm],
                         "density": None if algorithm in ("dense", "gloo") else DENSITY,
                         "time_ms": float(slowest.mean() * 1e3), "min_ms": float(slowest.min() * 1e3),
                         "bytes_sent": sent, "formula_bytes": formula_bytes(algorithm, world, size, k),
                         "wrong": int(wrong_total[0]), "iterations": iterations})
        # the dense ring's sum, checked against Gloo's: a mismatch counts on the dense row
        mismatched = np.count_nonzero(~np.isclose(dense_sum, gloo_sum.numpy(), rtol=1e-4, atol=1e-3))
        mismatched_total, _ = await group.allreduce(np.array([mismatched], np.int64))
        rows[ALGORITHMS.index("dense")]["wrong"] += int(mismatched_total[0])
    dist.destroy_process_group()
    report(None)
    gloo_ms = next(row["time_ms"] for row in rows if row["algorithm"] == "gloo")
    for row in rows:
        row["speedup_vs_gloo"] = gloo_ms / row["time_ms"]
    return rows


async def _time_dense(group: Any, grad: np.ndarray, out: np.ndarray, iterations: int) -> tuple[np.ndarray, int]:
    """Seconds of each timed ring allreduce into ``out`` (after one untimed), and its bytes sent."""
    times = np.empty(iterations)
    for index in range(iterations + 1):
        started = time.perf_counter()
        _, stats = await group.allreduce(grad, out=out)
        if index:
            times[index - 1] = time.perf_counter() - started
    return times, stats.bytes_sent


def _time_gloo(dist: Any, grad: Any, out: Any, iterations: int) -> np.ndarray:
    """Seconds of each timed Gloo allreduce (after one untimed); ``out`` ends with the sum. The
    copy of the gradient into ``out`` is not timed: DDP reduces its buckets in place."""
    times = np.empty(iterations)
    for index in range(iterations + 1):
        out.copy_(grad)
        started = time.perf_counter()
        dist.all_reduce(out)
        if index:
            times[index - 1] = time.perf_counter() - started
    return times


def _reporter(rank: int, reports: Any) -> Any:
    """How this rank reports its next phase: rank 0 through the parent's queue, or straight to
    a bar of its own under torchrun; other ranks stay silent. None ends the bar."""
    bar = PhaseBar(len(ALGORITHMS) + 1) if rank == 0 and reports is None else None

    def report(description: str | None) -> None:
        if rank != 0:
            return
        if bar is None:
            if description is not None:
                reports.put(description)
        elif description is None:
            bar.close()
        else:
            bar.next(description)
    return report


class PhaseBar:
    """A progress bar on stderr over a known number of phases: redrawn in place on a terminal
    (rich, which sparsecoll-bench already uses), one plain line a phase in pipes and logs."""

    def __init__(self, phases: int) -> None:
        from rich.console import Console

        self._phases, self._done, self._started = phases, -1, time.perf_counter()
        self._console = Console(stderr=True, highlight=False)
        self._bar = None
        if self._console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self._console, transient=True)
            self._task = self._bar.add_task("", total=phases)
            self._bar.start()

    def next(self, description: str) -> None:
        """The previous phase is done; ``description`` is under way."""
        self._done += 1
        if self._bar is not None:
            self._bar.update(self._task, completed=self._done, description=description)
        else:
            elapsed = time.perf_counter() - self._started
            print(f"[{self._done}/{self._phases}] {elapsed:5.1f}s  {description}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        """Take the bar off a terminal (a failed run's error then stands alone)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def close(self) -> None:
        """Every phase is done: the bar goes (a terminal) or says so in a last line (a pipe)."""
        if self._console.is_terminal:
            self.stop()
        elif self._done < self._phases:
            self._done = self._phases
            print(f"[{self._phases}/{self._phases}] {time.perf_counter() - self._started:5.1f}s  done",
                  file=sys.stderr, flush=True)


def link_words(link: str) -> str:
    """tc's '1gbit' as '1 Gbit/s', and '1gbit,5ms' as '1 Gbit/s, 5ms one-way'."""
    from sparsecoll.bench.netem import parse_link

    rate, delay = parse_link(link)
    number, prefix = rate.removesuffix("bit"), ""
    if number[-1] in "kmg":
        number, prefix = number[:-1], {"k": "k", "m": "M", "g": "G"}[number[-1]]
    return f"{number} {prefix}bit/s" + (f", {delay} one-way" if delay else "")


def conclusion(rows: Sequence[dict[str, Any]], where: Where) -> str:
    """One sentence: the sparse algorithms' ratio against Gloo in this run, and over what."""
    by_algorithm = {row["algorithm"]: row for row in rows}
    gtopk, cltk = by_algorithm["gtopk"]["speedup_vs_gloo"], by_algorithm["cltk"]["speedup_vs_gloo"]
    size, world = rows[0]["d"], rows[0]["ranks"]
    what = ("a ResNet-50-sized gradient (25M float32)" if size == RESNET50_ELEMENTS
            else f"a {size:,}-element float32 gradient")
    ratios = (f"gTop-k at 0.1% reduced {what} {speedup(gtopk)} than Gloo's allreduce and CLT-k "
              f"{speedup(cltk)}")
    if where.link is not None:
        return f"{ratios} over {world} emulated {link_words(where.link)} links (same run)."
    if under_launcher():
        return f"{ratios} over this job's network, {world} ranks (same run)."
    return (f"On loopback, {ratios} (same run); loopback has no bandwidth limit, so a dense allreduce is "
            f"memory-bound here and sparse selection costs more than it saves at small sizes: this run checks "
            f"results and bytes on the wire, not the time a slow network costs.")
