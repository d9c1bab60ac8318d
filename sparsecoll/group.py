"""Group: the ranks of one job, their transport, and the asyncio API users call.

A group numbers its collective calls; every rank must make the same calls in the same order.
Any failure (a lost peer, a timeout, a mismatch, a malformed frame, ``abort()``) poisons the
group on this rank and is sent to every other rank, so all of them raise promptly; a
poisoned group raises that error again on every later call, and ``close()`` releases it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np

from sparsecoll.call import Call, CollectiveResult, CommStats
from sparsecoll.collectives import dense
from sparsecoll.errors import (
    GroupAbortedError,
    GroupClosedError,
    InvalidArgumentError,
    SparseCollError,
)
from sparsecoll.rendezvous import Rendezvous, listen_host, resolve
from sparsecoll.transport import transport_class
from sparsecoll.transport.base import Transport
from sparsecoll.transport.handshake import group_id_for
from sparsecoll.transport.mailbox import copy_error
from sparsecoll.wire import DEFAULT_MAX_PAYLOAD, Signature

DEFAULT_TIMEOUT = 300.0
"""Seconds a collective may wait on the network before CollectiveTimeoutError (per call)."""

T = TypeVar("T")


class Group:
    """Rank, size, transport, sequence numbers and deadlines of one set of ranks."""

    def __init__(self, rank: int, size: int, transport: Transport, *, timeout: float,
                 backend: str, store: Any = None, name: str = "default") -> None:
        self.rank = rank
        self.size = size
        self.transport = transport
        self.timeout = timeout
        self.backend = backend
        self.store = store
        self.name = name
        self.context = 0
        self.total_stats = CommStats()
        self._seq = 0
        self._error: SparseCollError | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "failed" if self._error else "ready"
        return f"<Group {self.name!r} rank {self.rank}/{self.size} {self.backend} {state}>"

    @property
    def seq(self) -> int:
        """Number of collective calls started so far."""
        return self._seq

    @property
    def error(self) -> SparseCollError | None:
        """The failure that poisoned this group, if any."""
        return self._error

    # ----------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Group:
        return self

    async def __aexit__(self, exc_type, exc, traceback) -> None:
        if exc is not None and not isinstance(exc, SparseCollError) and not self._closed:
            self.abort(f"{type(exc).__name__} on rank {self.rank}")
        await self.close()

    def abort(self, reason: str = "") -> None:
        """Fail this group on every rank: the others raise GroupAbortedError promptly."""
        if self._closed:
            return
        self.poison(GroupAbortedError(f"group aborted by rank {self.rank}" + (f": {reason}" if reason else ""),
                                      rank=self.rank))

    async def close(self, linger: float = 1.0) -> None:
        """Say goodbye to the peers and release sockets; later calls raise GroupClosedError."""
        if self._closed:
            return
        self._closed = True
        self.transport.mailbox.fail(GroupClosedError("group closed", rank=self.rank))
        await self.transport.close(linger)

    def poison(self, error: SparseCollError) -> None:
        """Record the first failure, fail every wait on it, and tell the other ranks."""
        if self._error is not None or self._closed:
            return
        self._error = error
        self.transport.mailbox.fail(error)
        self.transport.fail_pending_sends(error)
        self.transport.send_abort(error)

    def _check_usable(self) -> None:
        if self._closed:
            raise GroupClosedError("the group is closed", rank=self.rank)
        if self._error is not None:
            raise copy_error(self._error)

    # ----------------------------------------------------------------- calls
    async def run(self, signature: Signature, body: Callable[[Call], Awaitable[T]],
                  timeout: float | None = None) -> CollectiveResult:
        """Run ``body`` as the next collective call of this group.

        This is the extension point for collectives: ``body`` receives a :class:`Call` whose
        frames carry ``signature``; its return value becomes ``CollectiveResult.value``.
        """
        self._check_usable()
        timeout = self.timeout if timeout is None else float(timeout)
        if timeout <= 0:
            raise InvalidArgumentError(f"timeout must be positive, got {timeout}", rank=self.rank)
        loop = asyncio.get_running_loop()
        seq = self._seq
        self._seq += 1
        call = Call(self.transport, self.rank, self.size, self.context, seq, signature,
                    loop.time() + timeout, timeout)
        mailbox = self.transport.mailbox
        mailbox.begin(self.context, seq, signature)
        started = time.perf_counter()
        try:
            value = await body(call)
        except SparseCollError as error:
            self.poison(error)
            raise
        except asyncio.CancelledError:
            self.poison(GroupAbortedError(f"collective #{seq} was cancelled on rank {self.rank}",
                                          rank=self.rank))
            raise
        finally:
            mailbox.end(self.context, seq)
        if self._error is not None:
            raise copy_error(self._error)
        call.stats.seconds = time.perf_counter() - started
        self.total_stats += call.stats
        return CollectiveResult(value, call.stats)

    # ----------------------------------------------------------------- dense collectives
    async def allreduce(self, array: np.ndarray, op: str = "sum", *, out: np.ndarray | None = None,
                        timeout: float | None = None) -> CollectiveResult:
        """Element-wise reduction over all ranks (sum, mean, max, min, prod); ``out=array``
        reduces in place."""
        return await dense.allreduce(self, array, op, out=out, timeout=timeout)

    async def allgather(self, array: np.ndarray, *, out: np.ndarray | None = None,
                        timeout: float | None = None) -> CollectiveResult:
        """Every rank's equally shaped array, stacked: result shape (size, *array.shape)."""
        return await dense.allgather(self, array, out=out, timeout=timeout)

    async def allgatherv(self, array: np.ndarray, *, counts: list[int] | None = None,
                         timeout: float | None = None) -> CollectiveResult:
        """Every rank's 1-D array of its own length; value is a list of ``size`` arrays
        (views into one contiguous buffer)."""
        return await dense.allgatherv(self, array, counts=counts, timeout=timeout)

    async def broadcast(self, array: np.ndarray, root: int = 0, *, out: np.ndarray | None = None,
                        timeout: float | None = None) -> CollectiveResult:
        """Root's array on every rank; other ranks pass an array of the same shape and dtype
        (``out=array`` receives in place)."""
        return await dense.broadcast(self, array, root, out=out, timeout=timeout)

    async def barrier(self, *, timeout: float | None = None) -> CollectiveResult:
        """Return once every rank has entered the barrier."""
        return await dense.barrier(self, timeout=timeout)


async def init_group(*, rank: int | None = None, world_size: int | None = None, store: Any = None,
                     init_method: str | None = None, backend: str | None = None,
                     timeout: float | None = None, secret: bytes | str | None = None,
                     host: str | None = None, name: str = "default",
                     max_payload: int = DEFAULT_MAX_PAYLOAD) -> Group:
    """Create a group: find the peers, connect and authenticate every pair.

    With no arguments it reads the environment torchrun sets (``env://``). ``store`` may be
    any ``torch.distributed.Store`` the caller already has. ``secret`` defaults to
    SPARSECOLL_SECRET, else to a random one shared through the store. ``timeout`` (default
    SPARSECOLL_TIMEOUT or 300 s) bounds the set-up and is every collective's default deadline.
    """
    backend = backend or os.environ.get("SPARSECOLL_BACKEND", "tcp")
    transport_type = transport_class(backend)
    timeout = float(os.environ.get("SPARSECOLL_TIMEOUT", DEFAULT_TIMEOUT)) if timeout is None else float(timeout)
    membership = await asyncio.to_thread(resolve, init_method, rank, world_size, store, timeout)
    rendezvous = Rendezvous(membership, name, timeout)
    prefix = await rendezvous.join()
    configured = secret if secret is not None else os.environ.get("SPARSECOLL_SECRET")
    if isinstance(configured, str):
        configured = configured.encode()
    shared_secret = await rendezvous.secret(configured)
    group: Group | None = None

    def on_failure(error: SparseCollError) -> None:
        if group is not None:
            group.poison(error)
        else:
            transport.mailbox.fail(error)

    transport = transport_type(membership.rank, membership.world_size, secret=shared_secret,
                                     group_id=group_id_for(prefix), on_failure=on_failure,
                                     max_payload=max_payload)
    try:
        address = await transport.listen(host or listen_host(membership.master_addr))
        addresses = await rendezvous.exchange_addresses(address)
        await transport.connect(addresses, timeout)
    except BaseException:
        await transport.close(linger=0.1)
        raise
    group = Group(membership.rank, membership.world_size, transport, timeout=timeout,
                  backend=backend, store=membership.store, name=name)
    if transport.mailbox.error is not None:
        group.poison(transport.mailbox.error)
    return group
