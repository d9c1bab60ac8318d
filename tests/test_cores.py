"""Ranks that share a host share its cores: the kernels' thread cap set up by init_group."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sparsecoll.cores import ranks_on_my_host, share_cores
from tests.ranks import run_ranks


def test_ranks_are_counted_by_host() -> None:
    addresses = ["10.0.0.1:4000", "10.0.0.1:4001", "10.0.0.2:4000", "[fe80::1]:9", "[fe80::1]:10"]
    assert [ranks_on_my_host(addresses, rank) for rank in range(5)] == [2, 2, 1, 2, 2]


def test_before_numba_is_imported_the_cap_goes_into_its_environment() -> None:
    code = ("import os, sys; from sparsecoll.cores import share_cores; "
            "print(share_cores(['h:1', 'h:2', 'h:3', 'h:4'], 0), 'numba' in sys.modules, "
            "os.environ['NUMBA_NUM_THREADS'])")
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    output = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    cap = max(1, (os.cpu_count() or 1) // 4)
    assert output.stdout.split() == [str(cap), "False", str(cap)]


def test_explicit_and_omp_caps_win(monkeypatch: pytest.MonkeyPatch) -> None:
    import numba

    caps: list[int] = []
    monkeypatch.setattr(numba, "set_num_threads", caps.append)  # leave this process's threads alone
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert share_cores(["h:1"], 0) == 1 and caps == [1]
    assert share_cores(["h:1", "h:2"], 0, kernel_threads=1) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert share_cores(["a:1", "b:2"], 0) is None  # alone on its host: no cap


async def kernel_threads_of_a_rank(group) -> int:
    import numba

    return numba.get_num_threads()


def test_local_ranks_split_the_cores() -> None:
    env = {"OMP_NUM_THREADS": ""}  # as without torchrun
    threads = run_ranks(2, kernel_threads_of_a_rank, env=env)
    assert threads == [max(1, (os.cpu_count() or 1) // 2)] * 2
