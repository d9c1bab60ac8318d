"""Finding peers: who am I, how many are we, and where does everybody listen.

The key-value store is torch.distributed's ``TCPStore`` (``env://``, multi-host) or
``FileStore`` (``file://``, one host): the same stores torchrun and ``init_process_group``
use, so a job launched by torchrun shares the agent's store, and a caller that already has a
``torch.distributed.Store`` can pass it in. Any object with ``set``, ``get``, ``add`` and
``wait`` in torch's shape works. The store only carries listener addresses (and, when no
``SPARSECOLL_SECRET`` is set, a random per-job secret); all data goes over the transport.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets as random_secrets
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from sparsecoll.errors import InvalidArgumentError, RendezvousError

KEY_PREFIX = "sparsecoll"


class Store(Protocol):
    """The subset of ``torch.distributed.Store`` the rendezvous uses."""

    def set(self, key: str, value: bytes | str) -> None: ...
    def get(self, key: str) -> bytes: ...
    def add(self, key: str, amount: int) -> int: ...
    def wait(self, keys: list[str], timeout: timedelta) -> None: ...


@dataclass(frozen=True)
class Membership:
    """This process's place in the job."""

    rank: int
    world_size: int
    store: Any
    master_addr: str


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise RendezvousError(f"{name}={value!r} is not an integer") from None


def resolve(init_method: str | None, rank: int | None, world_size: int | None, store: Any,
            timeout: float) -> Membership:
    """Work out rank, world size and store from the arguments, then the environment.

    ``env://`` reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT as torchrun sets them:
    under torchrun (TORCHELASTIC_USE_AGENT_STORE=True) every rank is a client of the agent's
    store; otherwise rank 0 hosts a TCPStore on MASTER_PORT. ``file:///path`` uses a
    FileStore for ranks on one host.
    """
    rank = _env_int("RANK") if rank is None else rank
    world_size = _env_int("WORLD_SIZE") if world_size is None else world_size
    if rank is None or world_size is None:
        raise RendezvousError("rank and world size unknown: pass rank= and world_size= or set "
                              "RANK and WORLD_SIZE (torchrun does)")
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvalidArgumentError(f"rank {rank} is not in a world of size {world_size}")
    master_addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if store is not None:
        return Membership(rank, world_size, store, master_addr)
    init_method = init_method or os.environ.get("SPARSECOLL_INIT_METHOD", "env://")
    from torch.distributed import FileStore, TCPStore  # torch's C++ stores, imported on demand

    if init_method.startswith("file://"):
        return Membership(rank, world_size, FileStore(init_method[len("file://"):], world_size),
                          "127.0.0.1")
    if init_method != "env://":
        raise InvalidArgumentError(f"unknown init_method {init_method!r} (env:// or file://PATH)")
    shared = _torch_default_store(rank, world_size)
    if shared is not None:
        return Membership(rank, world_size, shared, master_addr)
    port = _env_int("MASTER_PORT")
    if port is None:
        raise RendezvousError("MASTER_PORT is not set (torchrun sets it)", rank=rank)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    try:
        tcp_store = TCPStore(master_addr, port, world_size, is_master=rank == 0 and not agent_store,
                             timeout=timedelta(seconds=timeout), wait_for_workers=False)
    except (RuntimeError, OSError) as error:
        hint = (" (a torch.distributed process group created after this one cannot host its store on the "
                "same port: create it first, and init_group shares its store, or launch with torchrun)"
                if "in use" in str(error) else "")
        raise RendezvousError(f"cannot reach the store at {master_addr}:{port}: {error}{hint}",
                              rank=rank) from error
    return Membership(rank, world_size, tcp_store, master_addr)


def _torch_default_store(rank: int, world_size: int) -> Any:
    """The store of torch.distributed's default process group when this process has created one
    (``init_process_group`` over ``env://`` outside torchrun: rank 0 already hosts a TCPStore on
    MASTER_PORT, and a second one there would fail), for the same rank and world size; else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        return None
    default_store = getattr(dist.distributed_c10d, "_get_default_store", None)  # torch has no public accessor
    return None if default_store is None else default_store()


def listen_host(master_addr: str) -> str:
    """The address this rank listens on: SPARSECOLL_HOST, else the interface facing the master."""
    configured = os.environ.get("SPARSECOLL_HOST")
    if configured:
        return configured
    try:
        resolved = socket.getaddrinfo(master_addr, None)[0][4][0]
        if ipaddress.ip_address(resolved).is_loopback:
            return "127.0.0.1" if ":" not in resolved else "::1"
        family = socket.AF_INET6 if ":" in resolved else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((resolved, 9))  # a UDP connect sends nothing; it only picks the route
            return probe.getsockname()[0]
    except OSError as error:
        raise RendezvousError(f"cannot find a local address that reaches {master_addr}: {error}") from error


class Rendezvous:
    """Key-value exchanges of one group generation under ``sparsecoll/<name>/<generation>/``."""

    def __init__(self, membership: Membership, name: str, timeout: float) -> None:
        self.membership = membership
        self.name = name
        self.timeout = timeout
        self.prefix = ""

    async def _run(self, function, *args):
        try:
            return await asyncio.to_thread(function, *args)
        except (RuntimeError, OSError) as error:  # torch reports store timeouts as RuntimeError
            raise RendezvousError(f"store operation failed: {error}", rank=self.membership.rank) from error

    async def join(self) -> str:
        """Agree on a fresh key prefix: the n-th group created by every rank gets generation n."""
        store, world = self.membership.store, self.membership.world_size
        joined = await self._run(store.add, f"{KEY_PREFIX}/{self.name}/joined", 1)
        self.prefix = f"{KEY_PREFIX}/{self.name}/{(joined - 1) // world}"
        return self.prefix

    async def secret(self, configured: bytes | None) -> bytes:
        """The shared secret: the configured one, else one drawn by rank 0 for this job."""
        if configured:
            return configured
        store, key = self.membership.store, f"{self.prefix}/secret"
        if self.membership.rank == 0:
            await self._run(store.set, key, random_secrets.token_hex(32))
        await self._run(store.wait, [key], timedelta(seconds=self.timeout))
        return bytes(await self._run(store.get, key))

    async def exchange_addresses(self, address: str) -> list[str]:
        """Publish this rank's listener address and collect everybody's."""
        store, rank, world = self.membership.store, self.membership.rank, self.membership.world_size
        await self._run(store.set, f"{self.prefix}/addr/{rank}", address)
        keys = [f"{self.prefix}/addr/{peer}" for peer in range(world)]
        await self._run(store.wait, keys, timedelta(seconds=self.timeout))
        return [bytes(await self._run(store.get, key)).decode() for key in keys]
