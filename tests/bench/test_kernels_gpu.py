"""The kernel benchmark's CUDA rows, run under Numba's CUDA simulator (in its own process:
the simulator is chosen when Numba is imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import json
from sparsecoll.bench import kernels_gpu
assert kernels_gpu.gpu_available()
print(json.dumps(kernels_gpu.gpu_selection_rows([3000], [0.01], repeats=1)))
"""


def test_gpu_rows_choose_the_reference_indices_under_the_simulator() -> None:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["kind"] == "selection-gpu" and row["k"] == 30 and row["correct"] is True
    assert row["fast_ms"] > 0 and row["exact_ms"] > 0
    assert "torch_topk_ms" not in row  # torch here has no CUDA: its baseline is left out, not faked
