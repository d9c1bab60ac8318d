"""Where benchmark ranks run: spawned locally, on emulated links, or one per torchrun process.

The parent side (:func:`run_ranks`) picks the launch: under torchrun (RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set) this process is one rank; otherwise it spawns ``world``
local ranks, inside tbf-shaped network namespaces when a link rate is given (created and
always removed here). The rank side (:meth:`RankPlace.enter`) moves into its namespace,
points the transports at its address and returns the store every group of the run meets in.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sparsecoll.errors import InvalidArgumentError

PLUGINS_ENV = "SPARSECOLL_BENCH_IMPORT"
"""Comma-separated modules every rank imports first (``--import``): they register algorithms."""
BACKENDS = ("tcp", "ucx")
CLONE_NEWNS, MS_REC, MS_SLAVE, MNT_DETACH = 0x00020000, 0x4000, 0x80000, 2
LOOPBACK_UCX = {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"}
"""UCX over loopback TCP for local ranks, which any machine has; a variable already set wins."""


@dataclass(frozen=True)
class RankPlace:
    """A rank's network namespace and address on emulated links (None: the host's network),
    and the file store of a spawned run (None: torchrun's store from the environment)."""

    namespaces: tuple[str, ...] | None = None
    addresses: tuple[str, ...] | None = None
    interfaces: tuple[str, ...] | None = None
    store_path: str | None = None

    def enter(self, rank: int, world: int) -> Any:
        """Join this rank's network, share the cores fairly, and return the run's store."""
        import_plugins()
        import numba
        import torch
        import torch.distributed as dist

        # ranks share this host's cores: one thread each, as torchrun sets OMP_NUM_THREADS=1
        numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, (os.cpu_count() or 1) // world)))
        torch.set_num_threads(1)
        if self.namespaces is not None:
            from sparsecoll.bench.netem import enter_namespace

            enter_namespace(self.namespaces[rank])
            _private_sysfs()
            os.environ["SPARSECOLL_HOST"] = self.addresses[rank]
            os.environ["GLOO_SOCKET_IFNAME"] = self.interfaces[rank]
            os.environ["UCX_NET_DEVICES"] = self.interfaces[rank]
        if self.store_path is not None:
            return dist.FileStore(self.store_path, world)
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False)


def _private_sysfs() -> None:
    """Mount a sysfs of the current network namespace in a mount namespace of this process
    alone, as ``ip netns exec`` does: UCX lists network devices from /sys/class/net, which
    otherwise still shows the host's."""
    libc = ctypes.CDLL(None, use_errno=True)
    steps = ((libc.unshare, (CLONE_NEWNS,)), (libc.mount, (None, b"/", None, MS_REC | MS_SLAVE, None)),
             (libc.umount2, (b"/sys", MNT_DETACH)), (libc.mount, (b"sysfs", b"/sys", b"sysfs", 0, None)))
    for call, arguments in steps:
        if call(*arguments) != 0:
            raise OSError(ctypes.get_errno(), f"{call.__name__} for a private /sys failed")


def import_plugins(modules: list[str] | None = None) -> None:
    """Import ``modules`` (default: those named in ``SPARSECOLL_BENCH_IMPORT``) and name them in
    that variable, so spawned ranks, which inherit it, import them too."""
    inherited = modules is None
    if inherited:
        modules = [name for name in os.environ.get(PLUGINS_ENV, "").split(",") if name]
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise InvalidArgumentError(f"--import {name}: {error}") from None
    if modules and not inherited:
        os.environ[PLUGINS_ENV] = ",".join(modules)


def under_launcher() -> bool:
    """Whether torchrun (or anything that sets its variables) started this process as a rank."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def backend_env(backend: str, *, local: bool, shaped: bool = False) -> dict[str, str]:
    """Environment of the ranks for a transport; UCX stays on TCP over shaped links, since
    shared memory between namespaces would bypass them."""
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    env = {"SPARSECOLL_BACKEND": backend}
    if backend == "ucx":
        env["UCX_WARN_UNUSED_ENV_VARS"] = "n"
        if shaped:
            env["UCX_TLS"] = "tcp"
        elif local:
            env.update({key: value for key, value in LOOPBACK_UCX.items() if key not in os.environ})
    return env


def host_env(world: int, ranks_per_host: int) -> dict[int, dict[str, str]]:
    """Each spawned rank's emulated host, ``SPARSECOLL_HOST_ID`` (see :mod:`sparsecoll.topology`):
    ranks ``h*L .. h*L+L-1`` on host h; nothing when every rank is a host of its own."""
    if ranks_per_host < 1 or world % ranks_per_host:
        raise InvalidArgumentError(f"--ranks-per-host {ranks_per_host} does not divide {world} ranks")
    if ranks_per_host == 1:
        return {}
    return {rank: {"SPARSECOLL_HOST_ID": f"emulated-host-{rank // ranks_per_host}"} for rank in range(world)}


def run_ranks(world: int, target: Callable, *args: Any, backend: str = "tcp", link: str | None = None,
              timeout: float = 3600.0, every_rank: bool = False, ranks_per_host: int = 1) -> tuple[int, Any]:
    """Run ``target(rank, world, place, *args)`` on every rank (awaited when a coroutine
    function); returns (this process's rank, its result). Spawned runs return rank 0's result,
    or with ``every_rank`` the list of all ranks' results (under torchrun: this rank's, in a
    list). A rank's sparsecoll error is raised here. ``ranks_per_host`` L groups the spawned
    ranks into emulated hosts of L (one namespace each with ``link``; see :mod:`.netem`)."""
    if under_launcher():
        if link or ranks_per_host != 1:
            raise InvalidArgumentError("--link and --ranks-per-host spawn their own local ranks; they cannot run "
                                       "under torchrun (which tells sparsecoll the real hosts)")
        os.environ.update(backend_env(backend, local=False))
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        result = target(rank, world, RankPlace(), *args)
        result = asyncio.run(result) if asyncio.iscoroutine(result) else result
        return rank, [result] if every_rank else result
    from sparsecoll.launch import spawn

    env = backend_env(backend, local=True, shaped=link is not None)
    hosts = host_env(world, ranks_per_host)
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        place = RankPlace(store_path=os.path.join(scratch, "store"))
        if link:
            from sparsecoll.bench.netem import EmulatedNetwork

            net = stack.enter_context(EmulatedNetwork(world, link, ranks_per_host=ranks_per_host))
            place = RankPlace(tuple(net.namespace(r) for r in range(world)),
                              tuple(net.address(r) for r in range(world)),
                              tuple(net.interface(r) for r in range(world)), place.store_path)
        results = raise_rank_error(spawn(world, target, place, *args, timeout=timeout, env=env,
                                         per_rank_env=hosts))
    return 0, results if every_rank else results[0]


def raise_rank_error(results: list[Any]) -> list[Any]:
    """Spawned ranks' ``results``, once none is an error (the first one found is raised)."""
    failures = [result for result in results if isinstance(result, Exception)]
    if failures:
        raise failures[0]
    return results


async def with_group(rank: int, world: int, place: RankPlace, target: Callable, *args: Any) -> Any:
    """``await target(group, *args)`` in a group over this rank's place: the adapter for
    benchmarks written on a group (pass it to :func:`run_ranks` with the target)."""
    import sparsecoll

    store = place.enter(rank, world)
    async with await sparsecoll.init_group(store=store, rank=rank, world_size=world) as group:
        return await target(group, *args)


def world_size(requested: int) -> int:
    """The job's size under torchrun, else the number of ranks asked for."""
    return int(os.environ["WORLD_SIZE"]) if under_launcher() else requested


def this_rank() -> int:
    """This process's rank under torchrun; 0 for the parent of spawned ranks, which reports."""
    return int(os.environ["RANK"]) if under_launcher() else 0
