"""The GPU check's ``ucx`` step: two ranks on one GPU over UCX (run by :mod:`sparsecoll.bench.gpu_check`).

Each rank, in order (a check that raises is recorded and the next one still runs):

1. point to point, 256 MiB of device memory each way (a ping-pong, so one rank's clock times
   both directions): ``group.send`` of a cupy array and ``group.recv(out=cupy array)``, against
   the same bytes staged through pinned host memory (device to host, host send and receive,
   host to device), the path a transport without device support takes (the library's tally of
   its own staging copies during the direct round trips is noted where the tree keeps one);
2. a ring allreduce of a device array, checked against the numpy sum of both ranks' arrays;
3. a gTop-k of a device array, checked against the numpy reference (each rank's exact top-k,
   exchanged, summed, top k of the union).

The parent sets ``UCX_TLS=cuda_ipc,cuda_copy,tcp``. With ``--dry-run`` the same runs on host
(numpy) arrays over ``UCX_TLS=tcp`` on loopback at small sizes, and the device rows are skipped.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from sparsecoll.bench.gpu_check import DRY, FAIL, MISS, OK, SKIP, Row, emit, step_main
from sparsecoll.bench.host_copy_audit import library_copies
from sparsecoll.bench.table import binary_size, count

DEVICE_P2P_BYTES = 256 << 20
DRY_P2P_BYTES = 4 << 20
DEVICE_REDUCE_COUNT, DRY_REDUCE_COUNT = 16 << 20, 1 << 16
DEVICE_GTOPK_SIZE, DRY_GTOPK_SIZE = 4_000_000, 1 << 16
DENSITY = 0.001
P2P_TARGET_GBPS = 100.0
"""The issue's target for UCX cuda_ipc on 256 MiB."""
REPEATS = 3
RANK_TIMEOUT_S = 30.0


def host(array: Any) -> np.ndarray:
    """A numpy copy or view of a numpy, cupy or Numba device array."""
    if hasattr(array, "get"):
        return array.get()
    if hasattr(array, "copy_to_host"):
        return array.copy_to_host()
    return np.asarray(array)


def local_topk(grad: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by magnitude (indices ascending), the numpy reference."""
    chosen = np.sort(np.argpartition(np.abs(grad), grad.size - k)[grad.size - k:])
    return chosen, grad[chosen]


def reference_gtopk(grads: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """gTop-k of two ranks: each rank's top k, summed over the union of indices, top k of that."""
    (first_idx, first_val), (second_idx, second_val) = (local_topk(grad, k) for grad in grads)
    union = np.union1d(first_idx, second_idx)
    summed = np.zeros(union.size, np.float32)
    summed[np.searchsorted(union, first_idx)] += first_val
    summed[np.searchsorted(union, second_idx)] += second_val
    keep = np.sort(np.argpartition(np.abs(summed), summed.size - k)[summed.size - k:])
    return union[keep], summed[keep]


async def ping_pong(group: Any, send: Callable[[], Awaitable[Any]], receive: Callable[[], Awaitable[Any]],
                    repeats: int = REPEATS) -> float:
    """Best seconds of a round trip (rank 0 sends first, rank 1 answers), after one warm-up."""
    await group.barrier()
    best = float("inf")
    for attempt in range(repeats + 1):
        started = time.perf_counter()
        if group.rank == 0:
            await send()
            await receive()
        else:
            await receive()
            await send()
        if attempt:
            best = min(best, time.perf_counter() - started)
    return best


async def p2p_check(group: Any, xp: Any, nbytes: int, staged: bool) -> dict[str, Any]:
    """Round trips of ``nbytes`` of int32 between the ranks: direct, or staged through pinned host memory."""
    peer = 1 - group.rank
    count = nbytes // 4
    source = xp.arange(count, dtype=xp.int32) * (group.rank + 1)
    target = xp.zeros(count, xp.int32)
    if staged:
        from numba import cuda

        outgoing, incoming = cuda.pinned_array(count, np.int32), cuda.pinned_array(count, np.int32)

        async def send() -> None:
            source.get(out=outgoing)
            await group.send(outgoing, peer, timeout=RANK_TIMEOUT_S)

        async def receive() -> None:
            await group.recv(peer, out=incoming, timeout=RANK_TIMEOUT_S)
            target.set(incoming)
    else:
        async def send() -> None:
            await group.send(source, peer, timeout=RANK_TIMEOUT_S)

        async def receive() -> None:
            await group.recv(peer, out=target, timeout=RANK_TIMEOUT_S)
    counted = library_copies()
    if counted:
        counted[1]()
    seconds = await ping_pong(group, send, receive)
    copies = counted[0]()._asdict() if counted else None
    expected = xp.arange(count, dtype=xp.int32) * (peer + 1)
    return {"gbps": 2 * nbytes / seconds / 1e9, "seconds": seconds, "correct": bool((target == expected).all()),
            "library_copies": copies}


async def allreduce_check(group: Any, xp: Any, count: int) -> dict[str, Any]:
    """A ring allreduce of a (device) array against numpy's sum of both ranks' arrays."""
    arrays = [np.random.default_rng(10 + rank).standard_normal(count, dtype=np.float32) for rank in range(2)]
    mine = xp.asarray(arrays[group.rank])
    best, result = float("inf"), None
    for _ in range(REPEATS):
        await group.barrier()
        started = time.perf_counter()
        result, _ = await group.allreduce(mine, timeout=RANK_TIMEOUT_S)
        best = min(best, time.perf_counter() - started)
    correct = bool(np.allclose(host(result), arrays[0] + arrays[1], rtol=1e-6, atol=1e-6))
    return {"seconds": best, "busbw_gbps": mine.nbytes / best / 1e9, "correct": correct,
            "result_type": type(result).__module__.split(".")[0]}


async def gtopk_check(group: Any, xp: Any, size: int) -> dict[str, Any]:
    """A gTop-k of a (device) array against the numpy reference."""
    grads = [np.random.default_rng(20 + rank).standard_normal(size, dtype=np.float32) for rank in range(2)]
    k = max(1, int(size * DENSITY))
    await group.barrier()
    started = time.perf_counter()
    result, stats = await group.gtopk(xp.asarray(grads[group.rank]), k=k, timeout=RANK_TIMEOUT_S)
    seconds = time.perf_counter() - started
    indices, values = reference_gtopk(grads, k)
    correct = bool(np.array_equal(host(result.indices), indices)
                   and np.allclose(host(result.values), values, rtol=1e-6, atol=1e-6))
    return {"seconds": seconds, "k": k, "bytes_sent": stats.bytes_sent, "correct": correct,
            "result_type": type(result.values).__module__.split(".")[0]}


async def ucx_rank(group: Any, dry_run: bool) -> dict[str, Any]:
    """Every check of the module docstring on this rank; a failure is recorded, not raised."""
    if dry_run:
        xp, plan = np, [("p2p-host", p2p_check, (DRY_P2P_BYTES, False)),
                        ("allreduce", allreduce_check, (DRY_REDUCE_COUNT,)),
                        ("gtopk", gtopk_check, (DRY_GTOPK_SIZE,))]
    else:
        import cupy as xp

        plan = [("p2p-device", p2p_check, (DEVICE_P2P_BYTES, False)),
                ("p2p-staged", p2p_check, (DEVICE_P2P_BYTES, True)),
                ("allreduce", allreduce_check, (DEVICE_REDUCE_COUNT,)),
                ("gtopk", gtopk_check, (DEVICE_GTOPK_SIZE,))]
    results: dict[str, Any] = {}
    for name, check, arguments in plan:
        try:
            results[name] = await check(group, xp, *arguments)
        except Exception as error:  # recorded in the table; the next check still runs
            results[name] = {"error": f"{type(error).__name__}: {error}",
                             "where": traceback.format_exc().strip().splitlines()[-3:]}
    return results


def rows_from(results: dict[str, Any], dry_run: bool, tls: str) -> list[Row]:
    """The table rows from rank 0's results."""
    rows = []
    if dry_run:
        rows.append(Row("ucx", "p2p device 256 MiB", DRY))
    for name, result in results.items():
        if "error" in result:
            rows.append(Row("ucx", name, FAIL, note=f"{result['error']} at {result['where']}"[:600]))
            continue
        status = OK if result["correct"] else FAIL
        note = f"UCX_TLS={tls}" + ("" if result["correct"] else "; WRONG RESULT")
        if name == "p2p-device":
            staged = results.get("p2p-staged", {}).get("gbps")
            baseline = f"staged through host {staged:.3g} GB/s" if staged else "staged: failed"
            if status == OK and result["gbps"] < P2P_TARGET_GBPS:
                status, note = MISS, note + f"; target {P2P_TARGET_GBPS:g} GB/s"
            if staged:
                note += f"; {result['gbps'] / staged:.1f}x staged"
            if result.get("library_copies"):
                note += f"; library staging copies on rank 0: {result['library_copies']['count']}"
            rows.append(Row("ucx", "p2p device 256 MiB", status, f"{result['gbps']:.3g} GB/s", baseline, note,
                            result))
        elif name.startswith("p2p"):
            size = DRY_P2P_BYTES if dry_run else DEVICE_P2P_BYTES
            rows.append(Row("ucx", f"{name} {binary_size(size)}iB", status, f"{result['gbps']:.3g} GB/s",
                            note=note + "; round trips", metrics=result))
        elif name == "allreduce":
            size = DRY_REDUCE_COUNT if dry_run else DEVICE_REDUCE_COUNT
            rows.append(Row("ucx", f"ring allreduce {binary_size(4 * size)}iB float32", status,
                            f"{1e3 * result['seconds']:.3g} ms, busbw {result['busbw_gbps']:.3g} GB/s",
                            "numpy sum", note + f"; result is {result['result_type']}", result))
        else:
            size = DRY_GTOPK_SIZE if dry_run else DEVICE_GTOPK_SIZE
            rows.append(Row("ucx", f"gTop-k {count(size)} x 0.1%", status, f"{1e3 * result['seconds']:.3g} ms",
                            "numpy reference", note + f"; values are {result['result_type']}", result))
    return rows


def ucx_rows(dry_run: bool) -> None:
    """Run the two ranks and print their rows (SKIP rows when UCX or cupy is missing)."""
    from sparsecoll.launch import RankCrashed, spawn

    tls = os.environ.get("UCX_TLS", "")
    missing = missing_modules(["ucxx"] + ([] if dry_run else ["cupy"]))
    if missing:
        emit(Row("ucx", "two ranks over UCX", SKIP, note=missing))
        return
    try:
        results = spawn(2, ucx_rank, dry_run, timeout=max(10.0, float(os.environ.get("GPU_CHECK_STEP_TIMEOUT", 90)) - 10),
                        group_kwargs={"backend": "ucx", "timeout": RANK_TIMEOUT_S},
                        env={"SPARSECOLL_BACKEND": "ucx"})
    except RankCrashed as error:
        emit(Row("ucx", "two ranks over UCX", FAIL, note=str(error)[-600:]))
        return
    if not isinstance(results[0], dict):
        emit(Row("ucx", "two ranks over UCX", FAIL, note=f"rank 0: {results[0]!r}"[:600]))
        return
    for row in rows_from(results[0], dry_run, tls):
        emit(row)


def missing_modules(names: Sequence[str]) -> str:
    """Why the ranks cannot run here ('' when every module imports)."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception as error:
            return f"{name} cannot be imported ({type(error).__name__}: {error})"
    return ""


def main(argv: Sequence[str] | None = None) -> None:
    step_main(argv, {"ucx": ucx_rows}, "the GPU check's UCX step")


if __name__ == "__main__":
    main()
