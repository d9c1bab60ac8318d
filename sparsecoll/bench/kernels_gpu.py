"""The kernel benchmark's GPU rows: our CUDA top-k against torch.topk on the same device.

They run when Numba sees a CUDA device (``sparsecoll-bench kernels`` adds them by itself);
torch's baseline needs a CUDA build of torch and is left out otherwise. Every timing ends with
a device synchronize, so it is the kernel's time and not its launch's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sparsecoll.bench.kernels import best_time


def gpu_available() -> bool:
    """Whether Numba can run CUDA kernels here (a device, or its simulator when enabled)."""
    from numba import cuda

    return bool(cuda.is_available())


def gpu_selection_rows(sizes: Sequence[int], densities: Sequence[float], repeats: int = 3) -> list[dict[str, Any]]:
    """One row per (size, density): fast and exact CUDA top-k, torch.topk on CUDA when it can
    run, and whether all of them chose the CPU reference's indices."""
    from numba import cuda

    from sparsecoll.kernels import topk_exact, topk_fast

    torch_cuda = _torch_cuda()
    rows = []
    rng = np.random.default_rng(0)
    for size in sizes:
        host = rng.standard_normal(size, dtype=np.float32)
        device = cuda.to_device(host)
        tensor = None if torch_cuda is None else torch_cuda.from_numpy(host).cuda()
        for density in densities:
            k = max(1, int(size * density))
            reference, _ = topk_exact(host, k)
            chosen = [np.sort(np.asarray(_host(topk_fast(device, k)[0]))),
                      np.sort(np.asarray(_host(topk_exact(device, k)[0])))]
            row: dict[str, Any] = {
                "kind": "selection-gpu", "size": size, "density": density, "k": k,
                "fast_ms": 1e3 * best_time(lambda: topk_fast(device, k), repeats, cuda.synchronize),
                "exact_ms": 1e3 * best_time(lambda: topk_exact(device, k), repeats, cuda.synchronize)}
            if tensor is not None:
                row["torch_topk_ms"] = 1e3 * best_time(lambda: torch_cuda.topk(tensor.abs(), k, sorted=False),
                                                       repeats, torch_cuda.cuda.synchronize)
                chosen.append(np.sort(torch_cuda.topk(tensor.abs(), k, sorted=False).indices.cpu().numpy()))
                row["fast_vs_torch"] = row["torch_topk_ms"] / row["fast_ms"]
                row["exact_vs_torch"] = row["torch_topk_ms"] / row["exact_ms"]
            row["correct"] = all(np.array_equal(indices, reference) for indices in chosen)
            rows.append(row)
    return rows


def _host(array: Any) -> np.ndarray:
    return array.copy_to_host() if hasattr(array, "copy_to_host") else np.asarray(array)


def _torch_cuda() -> Any:
    """torch when it has a usable CUDA device, else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None
