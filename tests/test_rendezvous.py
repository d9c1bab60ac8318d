"""Finding peers: torchrun's environment, a rank-0 store, a file store, a caller's store."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import sparsecoll
from sparsecoll.errors import InvalidArgumentError, RendezvousError
from sparsecoll.rendezvous import listen_host, resolve
from tests.ranks import run_ranks


async def total_of_ranks(group) -> float:
    value, _ = await group.allreduce(np.array([group.rank + 1.0]))
    return float(value[0])


def test_file_store_for_one_host(tmp_path: Path) -> None:
    store_file = tmp_path / "store"
    results = run_ranks(3, total_of_ranks, timeout=60,
                        group_kwargs={"init_method": f"file://{store_file}"})
    assert results == [6.0] * 3


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A loopback port held for the block, so nothing else is handed it meanwhile.

    The socket is bound with SO_REUSEADDR and never listens: the kernel gives its port to no
    ``bind(0)`` or outgoing connection, while a server that binds it explicitly with
    SO_REUSEADDR (as torch's TCPStore does) can still listen on it. Probing a free port and
    closing the probe would leave a window in which another process takes the port.
    """
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


def test_a_reserved_port_is_taken_while_reserved() -> None:
    with reserved_port() as port, socket.socket() as other, pytest.raises(OSError, match="in use"):
        other.bind(("127.0.0.1", port))


def test_rank_zero_hosts_the_store_without_torchrun() -> None:
    with reserved_port() as port:
        env = {"TORCHELASTIC_USE_AGENT_STORE": "", "MASTER_PORT": str(port)}
        assert run_ranks(3, total_of_ranks, timeout=60, env=env) == [6.0] * 3


async def shared_with_torch(rank: int, world: int) -> tuple:
    """The caller's torch store serves both torch.distributed (Gloo) and two sparsecoll groups."""
    import torch
    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    first = await sparsecoll.init_group(store=store, rank=rank, world_size=world)
    second = await sparsecoll.init_group(store=store, rank=rank, world_size=world)
    data = np.arange(1000, dtype=np.float32) * (rank + 1)
    ours, _ = await first.allreduce(data)
    again, _ = await second.allreduce(data, op="max")
    reference = torch.from_numpy(data.copy())
    dist.all_reduce(reference)
    await first.close()
    await second.close()
    dist.destroy_process_group()
    return bool(np.array_equal(ours, reference.numpy())), float(again[-1]), first.name == second.name


def test_reuses_a_torch_store_beside_gloo() -> None:
    for same, maximum, same_name in run_ranks(2, shared_with_torch, timeout=90, group_kwargs=None):
        assert same and same_name
        assert maximum == 999 * 2


async def after_torch_over_env(rank: int, world: int) -> float:
    """torch's process group first, over env:// outside torchrun (its rank 0 hosts the store on
    MASTER_PORT), then a sparsecoll group with no store given: it must share torch's store, not
    try to host a second one on the same port."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        async with await sparsecoll.init_group(timeout=30) as group:
            return await total_of_ranks(group)
    finally:
        dist.destroy_process_group()


def test_a_group_after_torchs_own_shares_its_store() -> None:
    with reserved_port() as port:
        env = {"TORCHELASTIC_USE_AGENT_STORE": "False", "MASTER_PORT": str(port)}
        assert run_ranks(2, after_torch_over_env, timeout=60, env=env, group_kwargs=None) == [3.0] * 2


TORCHRUN_JOB = textwrap.dedent("""
    import asyncio, numpy as np, sparsecoll

    async def main():
        async with await sparsecoll.init_group(timeout=60) as group:
            value, stats = await group.allreduce(np.ones(10, np.float32) * group.rank)
            print(f"RESULT rank={group.rank} size={group.size} sum={value[0]:.0f}", flush=True)

    asyncio.run(main())
""")


@pytest.mark.slow
def test_runs_under_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(TORCHRUN_JOB)
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["SPARSECOLL_SECRET"] = "torchrun-test"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "3", str(script)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    # the ranks share one stdout pipe and print writes text and newline separately: match, not split
    lines = sorted(re.findall(r"RESULT rank=\d+ size=\d+ sum=\d+", run.stdout))
    assert lines == [f"RESULT rank={rank} size=3 sum=3" for rank in range(3)], run.stdout


def test_missing_environment_is_a_rendezvous_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RendezvousError, match="RANK"):
        resolve(None, None, None, None, 5.0)
    with pytest.raises(RendezvousError, match="MASTER_PORT"):
        resolve("env://", 0, 2, None, 5.0)
    with pytest.raises(InvalidArgumentError):
        resolve(None, 3, 2, None, 5.0)
    with pytest.raises(InvalidArgumentError, match="init_method"):
        resolve("tcp://x", 0, 1, None, 5.0)


def test_listen_host_follows_the_master_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPARSECOLL_HOST", raising=False)
    assert listen_host("127.0.0.1") == "127.0.0.1"
    assert listen_host("localhost") in ("127.0.0.1", "::1")
    monkeypatch.setenv("SPARSECOLL_HOST", "10.1.2.3")
    assert listen_host("127.0.0.1") == "10.1.2.3"
