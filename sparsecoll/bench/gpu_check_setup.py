"""The GPU check's ``setup`` step: what this machine offers the other steps, one row each.

Python, torch (and whether it sees a CUDA device), Numba's CUDA target (which fails to import
beside numpy 2.5 with some Numba releases, see shared/GPU.md), cupy, ucxx (carried as wheels),
and what ``tools/gpu_check.sh`` did with the wheels (``GPU_CHECK_SETUP``). A missing piece is a
SKIP row with its reason here, and the steps that need it say SKIP or FAIL with theirs.
"""

from __future__ import annotations

import importlib
import os
import platform
from collections.abc import Callable, Sequence

from sparsecoll.bench.gpu_check import DRY, OK, SKIP, Row, emit, step_main


def _torch(dry_run: bool) -> str:
    import torch

    if not torch.cuda.is_available() and not dry_run:
        raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{torch.__version__} (CUDA {torch.version.cuda}): {device}"


def _numba_cuda(dry_run: bool) -> str:
    import numba
    from numba import cuda

    if not cuda.is_available():
        raise RuntimeError("numba.cuda imports but sees no device")
    name = "the simulator" if dry_run else cuda.get_current_device().name
    return f"numba {numba.__version__}, " + (name.decode() if isinstance(name, bytes) else str(name))


def _version(module: str) -> Callable[[bool], str]:
    def read(dry_run: bool) -> str:
        return str(getattr(importlib.import_module(module), "__version__", "?"))
    return read


PROBES: tuple[tuple[str, Callable[[bool], str], bool], ...] = (
    ("torch", _torch, False), ("numba.cuda", _numba_cuda, True), ("numpy", _version("numpy"), False),
    ("cupy", _version("cupy"), True), ("ucxx", _version("ucxx"), False))
"""(name, probe, needs a GPU): a probe returns the version line or raises why it cannot."""


def setup_rows(dry_run: bool) -> None:
    emit(Row("setup", "python", OK, platform.python_version(), note=os.environ.get("GPU_CHECK_SETUP", "")))
    for name, probe, needs_gpu in PROBES:
        if dry_run and needs_gpu and name != "numba.cuda":
            emit(Row("setup", name, DRY))
            continue
        try:
            emit(Row("setup", name, OK, probe(dry_run)))
        except Exception as error:  # the reason is the row
            emit(Row("setup", name, SKIP, note=f"{type(error).__name__}: {error}"[:400]))


def main(argv: Sequence[str] | None = None) -> None:
    step_main(argv, {"setup": setup_rows}, "the GPU check's setup rows")
