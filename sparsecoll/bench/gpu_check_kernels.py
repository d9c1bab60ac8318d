"""The GPU check's kernel steps (run by :mod:`sparsecoll.bench.gpu_check`, one process each).

``topk``: our CUDA top-k (fast and exact, :func:`~sparsecoll.bench.kernels_gpu.gpu_selection_rows`)
against ``torch.topk`` on the same device and against a read floor: the time to read the array
once on the device (a max reduction, which reads every element once and writes one). The issue's
target: fast top-k at 25M, 0.1% within 2x the floor.

``quantize-sketch``: CUDA quantize (8/4/2/1 bits), dequantize and dense count-sketch insert,
each checked against the CPU kernel on the same data and timed against it.

With ``--dry-run`` the kernels run under Numba's CUDA simulator (the parent sets
``NUMBA_ENABLE_CUDASIM=1``) at simulator sizes, and the device-sized rows are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sparsecoll.bench.gpu_check import DRY, FAIL, MISS, OK, SKIP, Row, emit, step_main
from sparsecoll.bench.kernels import best_time
from sparsecoll.bench.table import count, percent

DEVICE_SIZES = (25_000_000, 100_000_000)
DENSITIES = (0.001, 0.01)
SIMULATOR_SIZE = 1024
FLOOR_TARGET = 2.0
"""The issue's target: our fast top-k at 25M, 0.1% within this factor of the read floor."""
QUANTIZE_SIZE = 25_000_000
SKETCH_ROWS = 5


def topk_rows(dry_run: bool) -> None:
    """Selection rows: device sizes on a GPU, one simulator size in a dry run."""
    from sparsecoll.bench import kernels_gpu

    if not kernels_gpu.gpu_available():
        emit(Row("topk", "CUDA top-k", SKIP, note="numba.cuda sees no device"))
        return
    sizes = (SIMULATOR_SIZE,) if dry_run else DEVICE_SIZES
    densities = (0.01,) if dry_run else DENSITIES
    if dry_run:
        for size in DEVICE_SIZES:
            emit(Row("topk", f"top-k {count(size)}", DRY))
    for size in sizes:
        floor_ms = None if dry_run else read_floor_ms(size)
        if floor_ms is None and not dry_run:
            emit(Row("topk", f"read floor {count(size)}", SKIP, note="torch has no CUDA device"))
        elif floor_ms is not None:
            emit(Row("topk", f"read floor {count(size)}", OK, f"{floor_ms:.3f} ms",
                     note=f"{4 * size / floor_ms / 1e6:.0f} GB/s read", metrics={"floor_ms": floor_ms}))
        try:
            for row in kernels_gpu.gpu_selection_rows([size], densities, repeats=1 if dry_run else 5):
                emit(selection_row(row, floor_ms, dry_run))
        except Exception as error:  # the next size still runs
            emit(Row("topk", f"top-k {count(size)}", FAIL, note=f"{type(error).__name__}: {error}"[:600]))


def selection_row(row: dict[str, Any], floor_ms: float | None, dry_run: bool) -> Row:
    """One selection measurement as a summary row, judged for correctness and the floor target."""
    torch_ms = row.get("torch_topk_ms")
    value = f"fast {row['fast_ms']:.3f} ms, exact {row['exact_ms']:.3f} ms"
    baseline = f"torch.topk {torch_ms:.3f} ms" if torch_ms is not None else "torch.topk: no CUDA torch"
    metrics = dict(row)
    notes = ["CUDA simulator"] if dry_run else []
    status = OK if row["correct"] else FAIL
    if not row["correct"]:
        notes.append("indices differ from the CPU reference")
    if floor_ms is not None:
        metrics["fast_vs_floor"] = row["fast_ms"] / floor_ms
        baseline += f"; floor {floor_ms:.3f} ms"
        notes.append(f"fast = {metrics['fast_vs_floor']:.2f}x floor")
        if row["size"] == DEVICE_SIZES[0] and row["density"] == DENSITIES[0] and status == OK \
                and metrics["fast_vs_floor"] > FLOOR_TARGET:
            status = MISS
            notes.append(f"target {FLOOR_TARGET:g}x")
    if torch_ms is not None:
        notes.append(f"fast {row['fast_vs_torch']:.2f}x torch's speed")
    return Row("topk", f"top-k {count(row['size'])} {percent(row['density'])}", status, value, baseline,
               "; ".join(notes), metrics)


def read_floor_ms(size: int, repeats: int = 10) -> float | None:
    """Milliseconds to read ``size`` float32 once on the device (torch's max reduction), or
    None when torch has no CUDA device."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    tensor = torch.randn(size, device="cuda")
    seconds = best_time(lambda: tensor.max(), repeats, torch.cuda.synchronize)
    del tensor
    return 1e3 * seconds


def quantize_sketch_rows(dry_run: bool) -> None:
    """Quantize, dequantize and sketch-insert rows, each against the CPU kernel."""
    from numba import cuda

    if not cuda.is_available():
        emit(Row("quantize-sketch", "CUDA quantize", SKIP, note="numba.cuda sees no device"))
        return
    size = SIMULATOR_SIZE if dry_run else QUANTIZE_SIZE
    if dry_run:
        emit(Row("quantize-sketch", f"quantize/sketch {count(QUANTIZE_SIZE)}", DRY))
    host = np.random.default_rng(2).standard_normal(size, dtype=np.float32)
    device = cuda.to_device(host)
    repeats = 1 if dry_run else 5
    for bits in (8,) if dry_run else (8, 4, 2, 1):
        guarded(f"quantize {bits}-bit", lambda: quantize_row(host, device, bits, repeats, cuda.synchronize, dry_run))
    guarded("sketch insert", lambda: sketch_row(host, device, repeats, cuda, dry_run))


def guarded(check: str, make_row: Callable[[], Row]) -> None:
    """Print the row ``make_row`` builds, or a FAIL row with the error it raised."""
    try:
        emit(make_row())
    except Exception as error:  # the next check still runs
        emit(Row("quantize-sketch", check, FAIL, note=f"{type(error).__name__}: {error}"[:600]))


def quantize_row(host: np.ndarray, device: Any, bits: int, repeats: int, synchronize: Callable[[], Any],
                 dry_run: bool) -> Row:
    """CUDA quantize + dequantize of ``host``'s device copy: same codes as the CPU kernel?"""
    from sparsecoll.kernels import dequantize, quantize

    packed, scales = quantize(device, bits)
    cpu_packed, cpu_scales = quantize(host, bits)
    decoded = dequantize(packed, scales, bits, host.size)
    same = bool(np.array_equal(packed.copy_to_host(), cpu_packed) and np.array_equal(scales.copy_to_host(), cpu_scales)
            and np.array_equal(decoded.copy_to_host(), dequantize(cpu_packed, cpu_scales, bits, host.size)))
    encode = best_time(lambda: quantize(device, bits), repeats, synchronize)
    decode = best_time(lambda: dequantize(packed, scales, bits, host.size), repeats, synchronize)
    cpu_encode = best_time(lambda: quantize(host, bits), 1)
    metrics = {"size": host.size, "bits": bits, "quantize_gbps": host.nbytes / encode / 1e9,
               "dequantize_gbps": host.nbytes / decode / 1e9, "cpu_quantize_gbps": host.nbytes / cpu_encode / 1e9,
               "correct": same}
    return Row("quantize-sketch", f"quantize {bits}-bit {count(host.size)}", OK if same else FAIL,
               f"{metrics['quantize_gbps']:.3g} / {metrics['dequantize_gbps']:.3g} GB/s",
               f"CPU quantize {metrics['cpu_quantize_gbps']:.3g} GB/s",
               "; ".join(filter(None, ["CUDA simulator" if dry_run else "",
                                       "" if same else "codes differ from the CPU kernel's"])), metrics)


def sketch_row(host: np.ndarray, device: Any, repeats: int, cuda: Any, dry_run: bool) -> Row:
    """Dense count-sketch insert on the device against the CPU insert of the same vector."""
    from sparsecoll.kernels import sketch_hashes, sketch_insert_dense

    columns = max(64, host.size // 100)
    hashes = sketch_hashes(SKETCH_ROWS, 0)
    table = cuda.to_device(np.zeros((SKETCH_ROWS, columns), np.float32))
    sketch_insert_dense(table, hashes, device)
    expected = sketch_insert_dense(np.zeros((SKETCH_ROWS, columns), np.float32), hashes, host)
    same = bool(np.allclose(table.copy_to_host(), expected, rtol=1e-4, atol=1e-3))
    seconds = best_time(lambda: sketch_insert_dense(table, hashes, device), repeats, cuda.synchronize)
    cpu_seconds = best_time(lambda: sketch_insert_dense(np.zeros_like(expected), hashes, host), 1)
    metrics = {"size": host.size, "rows": SKETCH_ROWS, "columns": columns, "gbps": host.nbytes / seconds / 1e9,
               "cpu_gbps": host.nbytes / cpu_seconds / 1e9, "correct": same}
    return Row("quantize-sketch", f"sketch insert {count(host.size)} into {SKETCH_ROWS}x{count(columns)}",
               OK if same else FAIL, f"{metrics['gbps']:.3g} GB/s", f"CPU {metrics['cpu_gbps']:.3g} GB/s",
               "; ".join(filter(None, ["CUDA simulator" if dry_run else "",
                                       "" if same else "table differs from the CPU insert's"])), metrics)


STEP_FUNCTIONS = {"topk": topk_rows, "quantize-sketch": quantize_sketch_rows}


def main(argv: Sequence[str] | None = None) -> None:
    step_main(argv, STEP_FUNCTIONS, "one kernel step of the GPU check")


if __name__ == "__main__":
    main()
