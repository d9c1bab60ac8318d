"""Numba's disk cache recompiles a kernel when only a helper it inlines changes (kernels/_cache.py).

In a copy of ``kernels/`` (a package of its own in a temporary directory), fresh processes
quantize the same array: the second run must hit the cache; after an edit of
``_scalar.stochastic_code`` alone (``quantize.py`` untouched) the next run must miss the cache
and give the edited helper's result, the same as a process with no cache at all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = """
import importlib, json, numpy as np, kcopy
module = importlib.import_module('kcopy.quantize')
packed, scales = kcopy.quantize(np.linspace(-1, 1, 64), 8, block_size=64, seed=3)
kernel = module._quantize_cpu
print(json.dumps({"packed": packed.tolist(), "hits": sum(kernel.stats.cache_hits.values()),
                  "misses": sum(kernel.stats.cache_misses.values())}))
"""


def run(package_parent: Path, cache_dir: Path | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{package_parent}{os.pathsep}{ROOT}")
    env.pop("NUMBA_CACHE_DIR", None)
    env.pop("NUMBA_DISABLE_JIT", None)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    completed = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True,
                               timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_editing_an_inlined_helper_recompiles_the_kernels_that_use_it(tmp_path: Path) -> None:
    package = tmp_path / "kcopy"
    shutil.copytree(ROOT / "kernels", package, ignore=shutil.ignore_patterns("__pycache__"))
    assert "_quantize_cpu" in (package / "quantize.py").read_text()
    first = run(tmp_path)
    again = run(tmp_path)
    assert again["hits"] >= 1 and again["misses"] == 0, again  # the cache works when nothing changed
    assert again["packed"] == first["packed"]

    helper = package / "_scalar.py"
    source = helper.read_text()
    assert source.count("    if u < pos - low:\n") == 1
    helper.write_text(source.replace("    if u < pos - low:\n", "    if 0.5 < pos - low:\n"))  # round to nearest
    edited = run(tmp_path)
    uncached = run(tmp_path, cache_dir=tmp_path / "fresh-cache")
    assert edited["hits"] == 0, edited  # the stale kernel was not loaded
    assert edited["packed"] == uncached["packed"] != first["packed"]
