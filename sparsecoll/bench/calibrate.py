"""``sparsecoll-bench calibrate``: measure the cost model's parameters on this job's ranks and links.

A few seconds of measurements, all with the job's real ranks so that shared cores and the real
network show: α from 8-byte allreduces (recursive doubling, per message on the critical path),
β from 16 MiB ring allreduces (what is left after α and the adds, per byte a rank sends), the
local kernels timed on every rank at once (top-k at two sizes for a per-element cost and a
fixed one, count-sketch insert and recovery, dense add, sparse merge, 8-bit quantize and
decode), and top-k on rank 0 alone (what CLT-k's leader pays when ranks share cores). Every
number is the slowest rank's, so every rank returns the same :class:`CostModel`. About 10 s
on 4 loopback ranks.
"""

from __future__ import annotations

import datetime
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import sparsecoll
from sparsecoll import kernels
from sparsecoll.bench.kernels import best_time
from sparsecoll.bench.ranks import RankPlace, run_ranks, under_launcher
from sparsecoll.bench.sparse import heavy_tailed
from sparsecoll.collectives.cost_model import SKETCH_ROWS, CostModel, default_path
from sparsecoll.collectives.sketch import default_columns
from sparsecoll.errors import InvalidArgumentError

SMALL_COUNT = 2
"""float32 values of the latency probe: 8 bytes."""
LARGE_BYTES = 16 << 20
"""Bytes of the bandwidth probe: large enough that α is a few percent of it on loopback."""
SELECT_SIZES = (1 << 20, 1 << 23)
"""Top-k is timed at both sizes: the slope is the per-element cost, the rest a fixed cost."""
SKETCH_SIZE = 1 << 20
MERGE_PAIRS = 25_000
QUANTIZE_SIZE = 1 << 20
QUANTIZE_BITS = 8
DENSITY = 0.001
LATENCY_CALLS_PER_ITERATION = 6


async def run_rank(group: sparsecoll.Group, *, link: str | None = None, iterations: int = 5,
                   timeout: float | None = None) -> CostModel:
    """Measure the cost model on ``group`` (at least 2 ranks); the same model on every rank."""
    if group.size < 2:
        raise InvalidArgumentError("calibration needs at least 2 ranks to time messages", rank=group.rank)
    if iterations < 1:
        raise InvalidArgumentError(f"iterations must be >= 1, not {iterations}", rank=group.rank)
    small = np.zeros(SMALL_COUNT, np.float32)
    large = np.zeros(LARGE_BYTES // 4, np.float32)
    await group.barrier(timeout=timeout)
    latency = await _collective_seconds(group, small, LATENCY_CALLS_PER_ITERATION * iterations, timeout)
    bandwidth = await _collective_seconds(group, large, iterations, timeout)
    del large
    vector = heavy_tailed(group.rank, SELECT_SIZES[-1])
    await group.barrier(timeout=timeout)  # all ranks compute at once: they share cores as in a step
    local = _local_seconds(vector, iterations)
    await group.barrier(timeout=timeout)  # rank 0 selects alone, as CLT-k's leader does
    lone = _median_seconds(lambda: _select(vector), iterations) if group.rank == 0 else 0.0
    await group.barrier(timeout=timeout)
    measured = np.array([latency, bandwidth, *local, lone])
    slowest, _ = await group.allreduce(measured, op="max", timeout=timeout)
    return fit(group.size, slowest, link=link or "unspecified")


async def _collective_seconds(group: sparsecoll.Group, array: np.ndarray, calls: int,
                              timeout: float | None) -> float:
    """Median seconds of an allreduce of ``array`` on this rank, after two untimed calls."""
    out = np.empty_like(array)
    seconds = []
    for index in range(calls + 2):
        started = time.perf_counter()
        await group.allreduce(array, out=out, timeout=timeout)
        if index >= 2:
            seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))


def _median_seconds(work: Callable[[], Any], repeats: int,
                    statistic: Callable[[list[float]], Any] = np.median) -> float:
    """Median (or ``statistic``) seconds of ``repeats`` calls of ``work``, after one untimed call
    that compiles or loads the Numba kernels and faults in the pages."""
    return best_time(work, repeats, statistic=statistic)


def _select(vector: np.ndarray) -> None:
    kernels.topk(vector, max(1, round(vector.size * DENSITY)), method="fast")


def _local_seconds(vector: np.ndarray, iterations: int,
                   statistic: Callable[[list[float]], Any] = np.median) -> list[float]:
    """Median (or ``statistic``) seconds of: top-k at both SELECT_SIZES, sketch insert +
    recovery, a dense add, a merge, a quantize + dequantize round trip."""
    def timed(work: Callable[[], Any], repeats: int) -> float:
        return _median_seconds(work, repeats, statistic)

    selections = [timed(lambda n=n: _select(vector[:n]), iterations) for n in SELECT_SIZES]
    k = round(SKETCH_SIZE * DENSITY)
    hashes = kernels.sketch_hashes(SKETCH_ROWS, 0)
    table = np.zeros((SKETCH_ROWS, default_columns(k)), np.float32)

    def sketch() -> None:
        table.fill(0)
        kernels.sketch_insert_dense(table, hashes, vector[:SKETCH_SIZE])
        kernels.sketch_heavy_hitters(table, hashes, SKETCH_SIZE, 4 * k)

    sketched = timed(sketch, max(2, iterations // 2))
    total = vector.copy()
    added = timed(lambda: np.add(total, vector, out=total), iterations)
    rng = np.random.default_rng(0)
    pairs = [(np.sort(rng.choice(vector.size, MERGE_PAIRS, replace=False)),
              rng.standard_normal(MERGE_PAIRS).astype(np.float32)) for _ in range(2)]

    def merge() -> None:
        indices, values = kernels.merge_sorted(*pairs[0], *pairs[1])
        kernels.topk_sparse(indices, values, MERGE_PAIRS)

    merged = timed(merge, iterations)

    def quantize() -> None:
        packed, scales = kernels.quantize(vector[:QUANTIZE_SIZE], QUANTIZE_BITS)
        kernels.dequantize(packed, scales, QUANTIZE_BITS, QUANTIZE_SIZE)

    quantized = timed(quantize, iterations)
    return [*selections, sketched, added, merged, quantized]


def fit(ranks: int, seconds: np.ndarray, *, link: str) -> CostModel:
    """The model behind the slowest ranks' medians [latency, bandwidth, select at both sizes,
    sketch, add, merge, quantize, rank 0 selecting alone], inverting the model's own formulas."""
    latency, bandwidth, select_small, select_large, sketched, added, merged, quantized, lone = \
        (float(s) for s in seconds)
    count = LARGE_BYTES // 4
    messages = CostModel(alpha=1.0, beta=0.0, reduce_per_element=0.0).doubling_allreduce(ranks, SMALL_COUNT)
    alpha = latency / messages  # recursive doubling's critical path, in messages
    reduce_per_element = added / SELECT_SIZES[-1]  # as _local_parameters has it
    overhead = CostModel(alpha=alpha, beta=0.0, reduce_per_element=reduce_per_element).ring_allreduce(ranks, count)
    wire = CostModel(alpha=0.0, beta=1.0, reduce_per_element=0.0).ring_allreduce(ranks, count)  # bytes, headers too
    beta = max(bandwidth - overhead, 0.1 * bandwidth) / wire  # noise must not make the link look free
    return CostModel(
        alpha=alpha, beta=beta, **_local_parameters(select_small, select_large, sketched, added, merged, quantized),
        lone_select_ratio=min(1.0, lone / select_large) if select_large > 0 else 1.0,
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        host=platform.node(), ranks=ranks, link=link)


def _local_parameters(select_small: float, select_large: float, sketched: float, added: float, merged: float,
                      quantized: float) -> dict[str, float]:
    """The model's local costs behind :func:`_local_seconds`' times (the model's formulas inverted)."""
    select_per_element = max(0.0, (select_large - select_small) / (SELECT_SIZES[1] - SELECT_SIZES[0]))
    return {"select_per_element": select_per_element,
            "select_fixed": max(0.0, select_small - select_per_element * SELECT_SIZES[0]),
            "sketch_per_element": sketched / (SKETCH_SIZE * SKETCH_ROWS),
            "reduce_per_element": added / SELECT_SIZES[-1], "merge_per_pair": merged / (2 * MERGE_PAIRS),
            "quantize_per_element": quantized / QUANTIZE_SIZE}


def calibrate_one_core(iterations: int = 5) -> CostModel:
    """The local costs of one rank on one core of its own (this process, one Numba thread, the
    fastest of ``iterations`` runs: other load only slows a run down); α and β left at 0 for a
    link to fill in. :class:`~sparsecoll.collectives.cost_contention.SharedCores` scales them to
    ranks that share a machine's cores."""
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        seconds = _local_seconds(heavy_tailed(0, SELECT_SIZES[-1]), iterations, statistic=min)
    finally:
        numba.set_num_threads(threads)
    return CostModel(alpha=0.0, beta=0.0, **_local_parameters(*seconds), lone_select_ratio=1.0,
                     date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                     host=platform.node(), ranks=1, link="none: local costs of one rank on one core")


# ---------------------------------------------------------------------------- the job's ranks
async def _calibrate_rank(rank: int, world: int, place: RankPlace, link: str, iterations: int) -> CostModel:
    store = place.enter(rank, world)
    async with await sparsecoll.init_group(store=store, rank=rank, world_size=world, timeout=300) as group:
        return await run_rank(group, link=link, iterations=iterations)


def calibrate(ranks: int = 4, link: str | None = None, output: str | None = None, *,
              iterations: int = 5, timeout: float = 600.0) -> CostModel:
    """Calibrate on ``ranks`` local ranks over ``link``-shaped emulated links (e.g. "1gbit"; root)
    or loopback, or on this torchrun job's ranks; rank 0 saves the model to ``output``
    (default: :func:`default_path`). Returns the model on every rank."""
    if ranks < 2 and not under_launcher():
        raise InvalidArgumentError(f"calibration needs at least 2 ranks, not {ranks}")
    description = f"{link} emulated (tc tbf)" if link else "torchrun job" if under_launcher() else "loopback"
    rank, model = run_ranks(ranks, _calibrate_rank, description, iterations, link=link, timeout=timeout)
    if rank == 0:
        model.save(output)
    return model


UNITS = {"alpha": ("us", 1e6), "beta": ("ns/B", 1e9), "select_per_element": ("ns", 1e9),
         "select_fixed": ("ms", 1e3), "lone_select_ratio": ("", 1.0), "sketch_per_element": ("ns", 1e9),
         "reduce_per_element": ("ns", 1e9), "merge_per_pair": ("ns", 1e9),
         "quantize_per_element": ("ns", 1e9)}


def print_model(model: CostModel, console: Any, output: str | None) -> None:
    """The model's parameters in their units, and where it was saved."""
    from sparsecoll.bench.table import Column, render

    rows = [{"parameter": name, "value": f"{getattr(model, name) * scale:.4g}", "unit": unit}
            for name, (unit, scale) in UNITS.items()]
    rows.append({"parameter": "bandwidth", "value": f"{1e-9 / model.beta:.3g}" if model.beta else "inf",
                 "unit": "GB/s"})
    render(f"cost model: {model.ranks} ranks, {model.link}, {model.host}, {model.date}",
           [Column("parameter", "parameter"), Column("value", "value"), Column("unit", "unit")], rows, console)
    console.print(f"saved to {output or default_path()}")
