"""Sparse collectives against dense ones, end to end (selection included), on loopback or on
emulated links (one network namespace per rank, tbf-shaped veth pairs; see ``netem``).

Every rank reduces the same kind of heavy-tailed float32 gradient with each algorithm; a row
reports the slowest rank's time per call, the bytes this algorithm put on the wire per rank
next to its formula, and its speed-up over torch.distributed Gloo's dense allreduce measured
in the same run on the same links. :func:`time_sparse` and :func:`count_wrong` are shared
with the ``collectives`` sweep.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

import sparsecoll
from sparsecoll import registry
from sparsecoll import kernels
from sparsecoll.bench.ranks import RankPlace
from sparsecoll.bench.table import Column, count, integer, milliseconds, nbytes, speedup
from sparsecoll.collectives.auto import shared_cost_model
from sparsecoll.collectives.cost_bytes import BYTE_FORMULAS, TWO_LEVEL_ALGORITHMS, bytes_sent, two_level_bytes
from sparsecoll.collectives.oktopk_state import OkTopkState
from sparsecoll.collectives.sparse_common import SparseResult, resolve_k

SPARSE_ALGORITHMS = ("allgather", "gtopk", "sketch", "cltk", "oktopk")
ALGORITHMS = ("dense", "gloo", *SPARSE_ALGORITHMS, "selection")
"""``selection`` times the local top-k alone: the part of every sparse row that is not the wire."""
COLUMNS = [("ranks", "P"), ("d", "d"), ("k", "k"), ("algorithm", "algorithm"),
           ("time_ms", "time (ms)"), ("min_ms", "min (ms)"), ("bytes_sent", "wire B/rank"),
           ("formula_bytes", "formula B/rank"), ("speedup_vs_gloo", "x faster than Gloo"),
           ("wrong", "#wrong")]
TABLE = [
    Column("ranks", "P", integer, constant=True), Column("d", "d", count, constant=True),
    Column("k", "k", count, constant=True), Column("algorithm", "algorithm"),
    Column("time_ms", "time", milliseconds), Column("min_ms", "min", milliseconds, default=False),
    Column("bytes_sent", "wire/rank", nbytes), Column("formula_bytes", "formula", nbytes),
    Column("speedup_vs_gloo", "vs Gloo dense", speedup), Column("wrong", "wrong", integer),
    Column("inter_host_bytes", "to other hosts/rank", nbytes),  # the mean over ranks
    Column("formula_inter_bytes", "its formula", nbytes, default=False),
]
AUTO_TABLE = [
    Column("ranks", "P", integer, constant=True), Column("d", "d", count, constant=True),
    Column("k", "k", count, constant=True), Column("pick", "auto's pick"),
    Column("predicted_ms", "predicted", milliseconds), Column("pick_ms", "measured", milliseconds),
    Column("best", "fastest"), Column("best_ms", "its time", milliseconds),
    Column("gap_pct", "gap", lambda value: f"{value:.0f}%"),
]
"""``"auto"``'s pick against the fastest measured (see ``cost_model.auto_gap``)."""


def formula_bytes(algorithm: str, ranks: int, size: int, k: int) -> int | None:
    """Bytes a rank sends per call by the algorithm's formula: the cost model's
    (:func:`sparsecoll.collectives.cost_bytes.bytes_sent`, headers and counts included, the mean
    over the ranks), rounded; Gloo's dense allreduce by its payload, 2(P-1)/P·4d (its own framing
    is not counted). The measured column is rank 0's, the same as the mean for dense (d a
    multiple of P), allgather and gTop-k at P a power of two; CLT-k's leader sends more than the
    others, and Ok-Topk's formula is its paper's bound."""
    if algorithm == "gloo":
        return int(2 * (ranks - 1) / ranks * 4 * size)
    if algorithm == "selection":
        return 0
    if algorithm not in BYTE_FORMULAS:
        return None  # a registered algorithm: no formula known here
    return round(bytes_sent(algorithm, ranks, size, k))


def two_level_formula_bytes(algorithm: str, hosts: int, per_host: int, size: int, k: int) -> int | None:
    """Bytes a rank sends to other hosts per two-level call, by the cost model's formula
    (:func:`sparsecoll.collectives.cost_bytes.two_level_bytes`, the mean rank's)."""
    if algorithm not in TWO_LEVEL_ALGORITHMS:
        return None
    return round(two_level_bytes(algorithm, hosts, per_host, size, k).inter_host)


def heavy_tailed(rank: int, size: int) -> np.ndarray:
    """A gradient-like vector: Student-t (2 d.o.f.) noise, seeded by rank."""
    return np.random.default_rng(rank).standard_t(2, size).astype(np.float32)


async def time_sparse(group: sparsecoll.Group, grad: np.ndarray, algorithm: str, density: float,
                      bits: int | None, iterations: int, warmup: int, *, hierarchical: bool = False,
                      last_stats: list | None = None) -> tuple[np.ndarray, int, int]:
    """Seconds per call of ``reduce_gradient`` (selection included), the bytes this rank sent in
    the last call, and this rank's share of wrong elements (see :func:`count_wrong`); the last
    call's CommStats are appended to ``last_stats`` when given."""
    times = np.empty(iterations)
    options = {"state": OkTopkState()} if algorithm == "oktopk" else {}  # reused thresholds, as in training
    for index in range(warmup + iterations):
        started = time.perf_counter()
        result, stats = await group.reduce_gradient(grad, algorithm, density=density,
                                                    quantize_bits=bits, step=index, hierarchical=hierarchical,
                                                    **options)
        if index >= warmup:
            times[index - warmup] = time.perf_counter() - started
    if last_stats is not None:
        last_stats.append(stats)
    topk = resolve_k(grad.size, None, density) if algorithm == "allgather" and not hierarchical else None
    wrong = await count_wrong(group, grad, result, topk, bits)
    return times, stats.bytes_sent, wrong


async def count_wrong(group: sparsecoll.Group, grad: np.ndarray, result: SparseResult, topk: int | None,
                      bits: int | None = None) -> int:
    """This rank's share of wrong entries in a sparse result (their sum over ranks is the total).

    The reference is numpy's sum of what every rank says it contributed: result plus every
    rank's residual must be the sum of the gradients, which error feedback relies on. A rank's
    unquantized contribution must be its own gradient's values, a local top-``topk`` selection
    (sparse allgather) must be ``topk`` of the largest magnitudes, and every rank must hold the
    same result (a disagreeing rank counts one). With ``bits``, ring algorithms re-round partial
    sums on the way, so the sum may differ from the contributions by a few rounding steps.
    """
    dense_sent = result.sent_indices is None  # a registered compressor: a lossy dense contribution
    sent_indices = np.arange(grad.size) if dense_sent else result.sent_indices.astype(np.int64)
    wrong = 0
    if bits is None and not dense_sent:
        wrong += int(np.count_nonzero(result.sent_values != grad[sent_indices]))
    if topk is not None:
        magnitude = np.abs(grad)
        kth = np.partition(magnitude, grad.size - topk)[grad.size - topk]
        wrong += abs(sent_indices.size - topk) + int(np.count_nonzero(magnitude[sent_indices] < kth))
    all_indices, _ = await group.allgatherv(sent_indices)
    all_values, _ = await group.allgatherv(result.sent_values.astype(np.float64))
    digest = zlib.crc32(result_indices(result).tobytes() + result.values.tobytes())
    digests, _ = await group.allgather(np.array([digest], np.int64))
    if digests[group.rank, 0] != digests[0, 0]:
        wrong += 1
    if group.rank == 0:
        wrong += _mismatches(result, np.concatenate(all_indices), np.concatenate(all_values), group.size, bits)
    return wrong


def result_indices(result: SparseResult) -> np.ndarray:
    """The indices a result's values stand at (every index for a dense result)."""
    return np.arange(result.size) if result.indices is None else result.indices


def reduces(algorithm: str) -> bool:
    """Whether ``algorithm`` runs through ``reduce_gradient``: a built-in sparse algorithm, or a
    collective or compressor registered by name (``--import`` the module that registers it)."""
    if algorithm in ALGORITHMS:  # dense, gloo and selection are timed as baselines
        return algorithm in SPARSE_ALGORITHMS
    return algorithm in registry.collectives() or algorithm in registry.compressors()


def _mismatches(result: SparseResult, indices: np.ndarray, values: np.ndarray, ranks: int,
                bits: int | None = None) -> int:
    """Entries where the result differs from the summed contributions by more than float32
    summation error in any order allows (plus, with ``bits``, one rounding step per hop of a
    ring whose largest partial sum sets the scale)."""
    keys, where = np.unique(np.concatenate([indices, result_indices(result)]), return_inverse=True)
    contributed = where[:indices.size]
    expected = np.bincount(contributed, weights=values, minlength=keys.size)
    magnitude = np.bincount(contributed, weights=np.abs(values), minlength=keys.size)
    tolerance = ranks * np.finfo(np.float32).eps * magnitude
    if bits:
        tolerance += ranks * float(magnitude.max(initial=0.0)) / max(1, 2 ** (bits - 1) - 1)
    got = np.zeros(keys.size)
    got[where[indices.size:]] = result.values
    return int(np.count_nonzero(np.abs(got - expected) > tolerance))


async def run_rank(rank: int, world: int, place: RankPlace, size: int, density: float,
                   algorithms: Sequence[str], iterations: int, ranks_per_host: int = 1,
                   hierarchical: str = "off") -> list[dict]:
    """One rank of the comparison; returns complete rows (slowest-rank times) on every rank.

    ``hierarchical`` "on" runs dense, allgather, gTop-k and CLT-k in two levels, "both" runs
    them flat and in two levels (the flat row first); rows then also report the bytes each
    rank sent to other hosts (its host per ``SPARSECOLL_HOST_ID``, see ``--ranks-per-host``)."""
    import torch
    import torch.distributed as dist

    store = place.enter(rank, world)
    if "gloo" in algorithms:
        dist.init_process_group("gloo", store=dist.PrefixStore("gloo", store), rank=rank, world_size=world)
    grad = heavy_tailed(rank, size)
    k = max(1, round(size * density))
    rows = []
    async with await sparsecoll.init_group(store=store, rank=rank, world_size=world, timeout=600) as group:
        if hierarchical != "off" or ranks_per_host > 1:
            await group.topology.discover()  # bytes to other hosts are counted from here on
        for algorithm, two_level in _variants(algorithms, hierarchical):
            stats: list = []
            if two_level or reduces(algorithm):  # the first call warms up (JIT, buffers), untimed
                times, sent, wrong = await time_sparse(group, grad, algorithm, density, None, iterations, 1,
                                                       hierarchical=two_level, last_stats=stats)
            else:
                before = group.total_stats.inter_host_bytes_sent
                times, sent, wrong = await _measure_baseline(group, dist, torch, algorithm, grad, density,
                                                             iterations)
                inter = (group.total_stats.inter_host_bytes_sent - before) // (iterations + 1)
                stats.append(sparsecoll.CommStats(inter_host_bytes_sent=inter))
            slowest, _ = await group.allreduce(times, op="max")
            wrong_total, _ = await group.allreduce(np.array([wrong], np.int64))
            row = {"ranks": world, "d": size, "k": k, "algorithm": algorithm + (" 2-level" if two_level else ""),
                   "time_ms": float(slowest.mean() * 1e3), "min_ms": float(slowest.min() * 1e3),
                   "bytes_sent": sent, "formula_bytes": formula_bytes(algorithm, world, size, k),
                   "wrong": int(wrong_total[0])}
            if group.topology.known:
                table = group.topology.table
                inter_total, _ = await group.allreduce(np.array([stats[-1].inter_host_bytes_sent], np.int64))
                row.update(hosts=table.host_count, ranks_per_host=table.shard_count,
                           inter_host_bytes=None if algorithm == "gloo" else int(inter_total[0]) // world)
                if two_level:
                    row["formula_inter_bytes"] = two_level_formula_bytes(algorithm, table.host_count,
                                                                         table.shard_count, size, k)
            rows.append(row)
        model = await shared_cost_model(group)  # what "auto" prices with here (calibrated online without a file)
        for row in rows:
            row.update(auto_model=model.to_array().tolist(), auto_model_link=model.link)
    if "gloo" in algorithms:
        dist.destroy_process_group()
        gloo_ms = next(row["time_ms"] for row in rows if row["algorithm"] == "gloo")
        for row in rows:
            row["speedup_vs_gloo"] = gloo_ms / row["time_ms"]
    return rows


TWO_LEVEL = ("dense", "allgather", "gtopk", "cltk")


def _variants(algorithms: Sequence[str], hierarchical: str) -> list[tuple[str, bool]]:
    """(algorithm, two-level?) of every row, in order: per ``hierarchical`` off, on or both."""
    variants = []
    for algorithm in algorithms:
        if hierarchical != "on" or algorithm not in TWO_LEVEL:
            variants.append((algorithm, False))
        if hierarchical != "off" and algorithm in TWO_LEVEL:
            variants.append((algorithm, True))
    return variants


async def _measure_baseline(group: sparsecoll.Group, dist: Any, torch: Any, algorithm: str, grad: np.ndarray,
                            density: float, iterations: int) -> tuple[np.ndarray, int | None, int]:
    """Dense (ours, checked against Gloo when it runs), Gloo, or the local selection alone."""
    out = np.empty_like(grad)
    tensor = torch.from_numpy(grad.copy())
    times = np.empty(iterations)
    sent = None if algorithm == "gloo" else 0  # Gloo does not tell
    for index in range(iterations + 1):  # the first call warms up and is not timed
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
            raise ValueError(f"unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
        if index:
            times[index - 1] = time.perf_counter() - started
    if algorithm == "dense" and dist.is_initialized():
        tensor.copy_(torch.from_numpy(grad))
        dist.all_reduce(tensor)
        return times, sent, int(np.count_nonzero(~np.isclose(out, tensor.numpy(), rtol=1e-4, atol=1e-3)))
    return times, sent, 0
