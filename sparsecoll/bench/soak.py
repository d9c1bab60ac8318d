"""Soak: many small allreduces on every rank, with memory and descriptors before and after.

A leak of one buffer, task or socket per call shows up here long before a training job hits
it. Each rank warms up first (so lazily created state is in the 'before' reading), then runs
the calls and reads its resident memory and open file descriptors again.
"""

from __future__ import annotations

import time

import numpy as np
import psutil

import sparsecoll
from sparsecoll.bench.table import Column, integer, number

COLUMNS = [("rank", "rank"), ("iterations", "calls"), ("errors", "errors"),
           ("rss_before_mib", "RSS before MiB"), ("rss_after_mib", "RSS after MiB"),
           ("rss_growth_pct", "RSS +%"), ("fds_before", "fds before"), ("fds_after", "fds after"),
           ("calls_per_s", "calls/s")]
TABLE = [
    Column("rank", "rank", integer), Column("iterations", "calls", integer, constant=True),
    Column("errors", "errors", integer), Column("rss_before_mib", "RSS before MiB", number, default=False),
    Column("rss_after_mib", "RSS MiB", number), Column("rss_growth_pct", "RSS growth", lambda v: f"{v:+.1f}%"),
    Column("fds_before", "fds before", integer), Column("fds_after", "fds after", integer),
    Column("calls_per_s", "calls/s", number),
]


async def run_rank(group: sparsecoll.Group, iterations: int, count: int = 2) -> dict:
    """``iterations`` allreduces of ``count`` float32 on this rank, with resource readings."""
    process = psutil.Process()
    data = np.full(count, group.rank + 1, np.float32)
    out = np.empty_like(data)
    expected = group.size * (group.size + 1) / 2
    for _ in range(200):
        await group.allreduce(data, out=out)
    rss_before, fds_before = process.memory_info().rss, process.num_fds()
    errors = 0
    started = time.perf_counter()
    for _ in range(iterations):
        await group.allreduce(data, out=out)
        errors += int(out[0] != expected)
    elapsed = time.perf_counter() - started
    await group.barrier()
    rss_after, fds_after = process.memory_info().rss, process.num_fds()
    return {"rank": group.rank, "iterations": iterations, "errors": errors,
            "rss_before_mib": rss_before / 2**20, "rss_after_mib": rss_after / 2**20,
            "rss_growth_pct": 100.0 * (rss_after - rss_before) / rss_before,
            "fds_before": fds_before, "fds_after": fds_after,
            "calls_per_s": iterations / elapsed}
