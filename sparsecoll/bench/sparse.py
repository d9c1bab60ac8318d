"""Sparse collectives against dense ones, end to end (selection included), on loopback or on
emulated links (one network namespace per rank, tbf-shaped veth pairs; see ``netem``).

Every rank reduces the same kind of heavy-tailed float32 gradient with each algorithm; a row
reports the slowest rank's time per call, the bytes this algorithm put on the wire per rank
next to its formula, and its speed-up over torch.distributed Gloo's dense allreduce measured
in the same run on the same links.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

import sparsecoll
from sparsecoll import kernels
from sparsecoll.collectives.sketch import default_columns
from sparsecoll.wire import HEADER_SIZE

ALGORITHMS = ("dense", "gloo", "allgather", "gtopk", "sketch", "cltk", "selection")
"""``selection`` times the local top-k alone: the part of every sparse row that is not the wire."""
COLUMNS = [("ranks", "P"), ("d", "d"), ("k", "k"), ("algorithm", "algorithm"),
           ("time_ms", "time (ms)"), ("min_ms", "min (ms)"), ("bytes_sent", "wire B/rank"),
           ("formula_bytes", "formula B/rank"), ("speedup_vs_gloo", "x faster than Gloo"),
           ("wrong", "#wrong")]


def formula_bytes(algorithm: str, ranks: int, size: int, k: int) -> int:
    """Bytes a rank sends per call by the algorithm's formula (headers and counts included)."""
    pair = 8 + 8 * k + HEADER_SIZE
    if algorithm in ("dense", "gloo"):
        return int(2 * (ranks - 1) / ranks * 4 * size)
    if algorithm == "allgather":
        return (ranks - 1) * pair
    if algorithm == "gtopk":
        return int(math.log2(ranks) * pair) if ranks & (ranks - 1) == 0 else int((math.log2(ranks) + 1) * pair)
    if algorithm == "sketch":
        values = 5 * default_columns(k) + 4 * k
        return int(2 * (ranks - 1) / ranks * 4 * values)
    if algorithm == "cltk":
        return int(3 * (ranks - 1) / ranks * 4 * k)
    if algorithm == "selection":
        return 0
    raise ValueError(algorithm)


def heavy_tailed(rank: int, size: int) -> np.ndarray:
    """A gradient-like vector: Student-t (2 d.o.f.) noise, seeded by rank."""
    return np.random.default_rng(rank).standard_t(2, size).astype(np.float32)


async def run_rank(rank: int, world: int, size: int, density: float, algorithms: Sequence[str],
                   iterations: int, network: dict | None, store_path: str) -> list[dict]:
    """One rank of the comparison; returns complete rows (slowest-rank times) on every rank."""
    import numba
    import torch
    import torch.distributed as dist

    # ranks share this host's cores: one thread each, as torchrun sets OMP_NUM_THREADS=1
    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, (os.cpu_count() or 1) // world)))
    torch.set_num_threads(1)
    if network is not None:
        from sparsecoll.bench.netem import enter_namespace

        enter_namespace(network["namespaces"][rank])
        os.environ["SPARSECOLL_HOST"] = network["addresses"][rank]
        os.environ["GLOO_SOCKET_IFNAME"] = network["interfaces"][rank]
    store = dist.FileStore(store_path, world)
    if "gloo" in algorithms:
        dist.init_process_group("gloo", store=dist.PrefixStore("gloo", store), rank=rank, world_size=world)
    grad = heavy_tailed(rank, size)
    k = max(1, round(size * density))
    rows = []
    async with await sparsecoll.init_group(store=store, rank=rank, world_size=world, timeout=600) as group:
        for algorithm in algorithms:
            times, sent, wrong = await _measure(group, dist, torch, algorithm, grad, density, iterations)
            slowest, _ = await group.allreduce(times, op="max")
            wrong_total, _ = await group.allreduce(np.array([wrong], np.int64))
            rows.append({"ranks": world, "d": size, "k": k, "algorithm": algorithm,
                         "time_ms": float(slowest.mean() * 1e3), "min_ms": float(slowest.min() * 1e3),
                         "bytes_sent": sent, "formula_bytes": formula_bytes(algorithm, world, size, k),
                         "wrong": int(wrong_total[0])})
    if "gloo" in algorithms:
        dist.destroy_process_group()
        gloo_ms = next(row["time_ms"] for row in rows if row["algorithm"] == "gloo")
        for row in rows:
            row["speedup_vs_gloo"] = gloo_ms / row["time_ms"]
    return rows


async def _measure(group: sparsecoll.Group, dist: Any, torch: Any, algorithm: str, grad: np.ndarray,
                   density: float, iterations: int) -> tuple[np.ndarray, int, int]:
    """Times per call (selection included), bytes this rank sent in one call, wrong results."""
    out = np.empty_like(grad)
    tensor = torch.from_numpy(grad.copy())
    times = np.empty(iterations)
    sent = 0
    digest = np.zeros(1, np.int64)
    for index in range(iterations + 1):  # the first call warms up (JIT, buffers) and is not timed
        started = time.perf_counter()
        if algorithm == "gloo":
            tensor.copy_(torch.from_numpy(grad))
            dist.all_reduce(tensor)
        elif algorithm == "dense":
            _, stats = await group.allreduce(grad, out=out)
            sent = stats.bytes_sent
        elif algorithm == "selection":
            kernels.topk(grad, max(1, round(grad.size * density)), method="fast", seed=index)
        else:
            result, stats = await group.reduce_gradient(grad, algorithm, density=density, step=index)
            sent = stats.bytes_sent
            digest[0] = zlib.crc32(result.indices.tobytes() + result.values.tobytes())
        if index:
            times[index - 1] = time.perf_counter() - started
    if algorithm == "selection":
        return times, sent, 0
    if algorithm == "dense" and dist.is_initialized():
        dist.all_reduce(tensor)
        digest[0] = int(np.count_nonzero(~np.isclose(out, tensor.numpy(), rtol=1e-4, atol=1e-3)))
        return times, sent, int(digest[0])
    # every rank must hold the same sparse result: count the ranks that disagree with rank 0
    digests, _ = await group.allgather(digest)
    return times, sent, int(np.count_nonzero(digests != digests[0]))
