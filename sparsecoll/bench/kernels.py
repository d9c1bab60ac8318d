"""Kernel benchmark: selection against torch.topk / numpy.argpartition / one abs pass, plus
count-sketch and quantization throughput and the first-call JIT cost.

Run as ``python -m sparsecoll.bench.kernels [--json FILE] [--sizes 1M 25M 100M]``. Every
baseline runs in the same process on the same data, so the ratios are what to read; absolute
times move with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sparsecoll.bench.common import parse_count
from sparsecoll.bench.table import Column, count, milliseconds, number, percent, render, speedup

DEFAULT_SIZES = (1_000_000, 25_000_000, 100_000_000)
DEFAULT_DENSITIES = (0.01, 0.001)
SKETCH_SIZE = 25_000_000


def best_time(run: Callable[[], Any], repeats: int, synchronize: Callable[[], Any] = lambda: None,
              statistic: Callable[[list[float]], Any] = min) -> float:
    """Best wall time (or ``statistic`` of the times, e.g. ``np.median``) of ``repeats`` runs in
    seconds, after one warm-up run (inf without runs); ``synchronize`` (a device's) ends every
    run, so asynchronous kernels are timed to completion."""
    run()
    synchronize()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize()
        seconds.append(time.perf_counter() - start)
    return float(statistic(seconds)) if seconds else float("inf")


def _selection_row(grad: np.ndarray, density: float, repeats: int) -> dict[str, Any]:
    import torch

    from sparsecoll.kernels import select_threshold, topk_exact, topk_fast

    size = grad.size
    k = max(1, int(size * density))
    tensor = torch.from_numpy(grad)
    magnitude = np.abs(grad)
    cut = float(np.partition(magnitude, size - k)[size - k])
    fast_idx, _ = topk_fast(grad, k)
    exact_idx, _ = topk_exact(grad, k)
    torch_idx = np.sort(torch.topk(tensor.abs(), k, sorted=False).indices.numpy())
    times = {
        "torch_topk_ms": best_time(lambda: torch.topk(tensor.abs(), k, sorted=False), repeats),
        "argpartition_ms": best_time(lambda: np.argpartition(np.abs(grad), size - k), repeats),
        "abs_pass_ms": best_time(lambda: np.abs(grad) > cut, repeats),
        "fast_ms": best_time(lambda: topk_fast(grad, k), repeats),
        "exact_ms": best_time(lambda: topk_exact(grad, k), repeats),
        "threshold_ms": best_time(lambda: select_threshold(grad, cut), repeats),
    }
    row: dict[str, Any] = {"kind": "selection", "size": size, "density": density, "k": k}
    row.update({name: seconds * 1e3 for name, seconds in times.items()})
    row["fast_vs_torch"] = row["torch_topk_ms"] / row["fast_ms"]
    row["exact_vs_torch"] = row["torch_topk_ms"] / row["exact_ms"]
    row["fast_vs_argpartition"] = row["argpartition_ms"] / row["fast_ms"]
    row["threshold_vs_abs"] = row["threshold_ms"] / row["abs_pass_ms"]
    row["correct"] = bool(
        np.array_equal(fast_idx, exact_idx) and np.array_equal(exact_idx, torch_idx)
    )
    return row


def _sketch_row(repeats: int) -> dict[str, Any]:
    from sparsecoll.kernels import sketch_hashes, sketch_insert_dense

    grad = np.random.default_rng(1).standard_normal(SKETCH_SIZE, dtype=np.float32)
    rows, columns = 5, SKETCH_SIZE // 100
    hashes = sketch_hashes(rows, 0)
    table = np.zeros((rows, columns), np.float32)
    seconds = best_time(lambda: sketch_insert_dense(table, hashes, grad), repeats)
    return {
        "kind": "sketch",
        "size": SKETCH_SIZE,
        "rows": rows,
        "columns": columns,
        "ms": seconds * 1e3,
        "gbps": grad.nbytes / seconds / 1e9,
    }


def _quantize_rows(size: int, repeats: int) -> list[dict[str, Any]]:
    from sparsecoll.kernels import dequantize, quantize

    grad = np.random.default_rng(2).standard_normal(size, dtype=np.float32)
    out = []
    for bits in (8, 4, 2, 1):
        packed, scales = quantize(grad, bits)
        encode = best_time(lambda: quantize(grad, bits), repeats)
        decode = best_time(lambda: dequantize(packed, scales, bits, size), repeats)
        out.append(
            {
                "kind": "quantize",
                "size": size,
                "bits": bits,
                "quantize_ms": encode * 1e3,
                "dequantize_ms": decode * 1e3,
                "quantize_gbps": grad.nbytes / encode / 1e9,
                "dequantize_gbps": grad.nbytes / decode / 1e9,
            }
        )
    return out


_FIRST_CALL = """
import time
start = time.perf_counter()
import numpy as np
import sparsecoll.kernels as K
imported = time.perf_counter()
x = np.random.default_rng(0).standard_normal(1 << 17).astype(np.float32)
K.topk_fast(x, 100); K.topk_exact(x, 100); K.select_threshold(x, 2.0)
K.quantize(x, 4); K.sketch_insert_dense(np.zeros((3, 100), np.float32), K.sketch_hashes(3, 0), x)
done = time.perf_counter()
print(imported - start, done - imported)
"""


def _jit_rows() -> list[dict[str, Any]]:
    """Import and first-call time in fresh processes: empty cache, then the cache it filled."""
    out = []
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
        for label in ("cold cache", "warm cache"):
            result = subprocess.run(
                [sys.executable, "-c", _FIRST_CALL], env=env, capture_output=True, text=True, check=True
            )
            import_s, first_call_s = (float(v) for v in result.stdout.split())
            out.append({"kind": "jit", "cache": label, "import_s": import_s, "first_calls_s": first_call_s})
    return out


def run_kernel_bench(
    sizes: Sequence[int] = DEFAULT_SIZES,
    densities: Sequence[float] = DEFAULT_DENSITIES,
    *,
    repeats: int = 3,
    large_repeats: int = 1,
    sketch: bool = True,
    quantize: bool = True,
    jit: bool = True,
    gpu: bool | None = None,
    gpu_sizes: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Runs the benchmark and returns one dict per table row (JSON-ready). ``gpu`` (default:
    when Numba sees a CUDA device) adds the CUDA selection rows, at ``gpu_sizes`` (default
    ``sizes``)."""
    import torch

    from sparsecoll.bench import kernels_gpu

    rows: list[dict[str, Any]] = []
    if jit:
        rows.extend(_jit_rows())
    rng = np.random.default_rng(0)
    for size in sizes:
        grad = rng.standard_normal(size, dtype=np.float32)
        reps = large_repeats if size >= 50_000_000 else repeats
        for density in densities:
            row = _selection_row(grad, density, reps)
            row["threads"] = torch.get_num_threads()
            rows.append(row)
        del grad
    if kernels_gpu.gpu_available() if gpu is None else gpu:
        rows.extend(kernels_gpu.gpu_selection_rows(gpu_sizes or sizes, densities, repeats))
    if sketch:
        rows.append(_sketch_row(repeats))
    if quantize:
        rows.extend(_quantize_rows(SKETCH_SIZE, repeats))
    return rows


SELECTION_TABLE = [
    Column("size", "size", count), Column("density", "density", percent), Column("k", "k", count, default=False),
    Column("torch_topk_ms", "torch.topk", milliseconds), Column("argpartition_ms", "argpartition", milliseconds,
                                                                  default=False),
    Column("abs_pass_ms", "abs>t", milliseconds, default=False), Column("fast_ms", "fast", milliseconds),
    Column("exact_ms", "exact", milliseconds), Column("threshold_ms", "threshold", milliseconds, default=False),
    Column("fast_vs_torch", "fast vs torch", speedup), Column("exact_vs_torch", "exact vs torch", speedup,
                                                              default=False),
    Column("fast_vs_argpartition", "fast vs argp", speedup, default=False),
    Column("threshold_vs_abs", "thr/abs", number, default=False), Column("correct", "correct"),
]
GPU_TABLE = [
    Column("size", "size", count), Column("density", "density", percent), Column("k", "k", count, default=False),
    Column("torch_topk_ms", "torch.topk", milliseconds), Column("fast_ms", "fast", milliseconds),
    Column("exact_ms", "exact", milliseconds), Column("fast_vs_torch", "fast vs torch", speedup),
    Column("exact_vs_torch", "exact vs torch", speedup, default=False), Column("correct", "correct"),
]
OTHER_TABLE = [Column("kernel", "kernel"), Column("detail", "detail"), Column("time", "time"),
               Column("throughput", "throughput")]


def _other_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Sketch, quantization and JIT rows as (kernel, detail, time, throughput) text."""
    out = []
    for r in rows:
        if r["kind"] == "sketch":
            out.append({"kernel": "count sketch insert", "detail": f"{count(r['size'])} into {r['rows']}x"
                        f"{count(r['columns'])}", "time": milliseconds(r["ms"]),
                        "throughput": f"{r['gbps']:.2f} GB/s"})
        elif r["kind"] == "quantize":
            out.append({"kernel": f"quantize {r['bits']}-bit", "detail": f"{count(r['size'])} float32",
                        "time": f"{milliseconds(r['quantize_ms'])} / {milliseconds(r['dequantize_ms'])}",
                        "throughput": f"{r['quantize_gbps']:.2f} / {r['dequantize_gbps']:.2f} GB/s"})
        elif r["kind"] == "jit":
            out.append({"kernel": "import + first calls", "detail": r["cache"],
                        "time": f"{r['import_s']:.2f}s + {r['first_calls_s']:.2f}s", "throughput": "-"})
    return out


def print_table(rows: Sequence[dict[str, Any]], console: Any = None, *, wide: bool = False) -> None:
    """Prints the rows as tables, one per kind (the short columns; every column with ``wide``)."""
    from rich.console import Console

    console = console or Console()
    selection = [dict(r, correct="yes" if r["correct"] else "NO") for r in rows if r["kind"] == "selection"]
    if selection:
        render("top-k selection, float32, CPU (vs: ours against torch.topk)", SELECTION_TABLE, selection,
               console, wide=wide)
    on_gpu = [dict(r, correct="yes" if r["correct"] else "NO") for r in rows if r["kind"] == "selection-gpu"]
    if on_gpu:
        render("top-k selection, float32, CUDA", GPU_TABLE, on_gpu, console, wide=wide)
    others = _other_rows(rows)
    if others:
        render("throughput (encode / decode) and JIT cost", OTHER_TABLE, others, console, wide=wide)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Command-line entry: parse arguments, run, print, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_file", help="write the rows to this JSON file")
    parser.add_argument("--sizes", nargs="+", default=None, help="vector sizes, e.g. 1M 25M 100M")
    parser.add_argument("--densities", nargs="+", type=float, default=list(DEFAULT_DENSITIES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-jit", action="store_true", help="skip the first-call JIT measurement")
    args = parser.parse_args(argv)
    sizes = [parse_count(s) for s in args.sizes] if args.sizes else list(DEFAULT_SIZES)
    rows = run_kernel_bench(sizes, args.densities, repeats=args.repeats, jit=not args.no_jit)
    print_table(rows)
    if args.json_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_file)), exist_ok=True)
        with open(args.json_file, "w") as handle:
            json.dump({"benchmark": "kernels", "rows": rows}, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
