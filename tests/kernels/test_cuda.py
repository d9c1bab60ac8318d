"""Runs the CUDA kernel cases in their own process: under the simulator always, on a GPU if present.

``NUMBA_ENABLE_CUDASIM`` is read when numba is imported, so it cannot be switched inside this
process; one subprocess with the variable set runs every case file (the kernels', the fused
pass's, the sketch recovery's) and must pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = [Path(__file__).with_name(name) for name in ("cuda_cases.py", "cuda_fused_cases.py", "sketch_cuda_cases.py",
                                                      "cuda_stream_cases.py")]
ROOT = Path(__file__).resolve().parents[2]


def run_cases(simulate: bool) -> None:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1" if simulate else "0")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *map(str, CASES)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1], report


def test_cuda_kernels_under_simulator():
    run_cases(simulate=True)


@pytest.mark.gpu
def test_cuda_kernels_on_device():
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") != "0":
        pytest.skip("this process runs the CUDA simulator")
    from numba import cuda

    if not cuda.is_available():
        pytest.skip("no CUDA device")
    run_cases(simulate=False)
