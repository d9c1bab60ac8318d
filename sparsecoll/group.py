"""Group: the ranks of one job, their transport, and the asyncio API users call.

A group numbers its collective calls; every rank must make the same calls in the same order.
Any failure (a lost peer, a timeout, a mismatch, a malformed frame, ``abort()``) poisons the
group on this rank and is sent to every other rank, so all of them raise promptly; a
poisoned group raises that error again on every later call, and ``close()`` releases it.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from sparsecoll import p2p, registry
from sparsecoll.call import Call, CollectiveResult, CommStats
from sparsecoll.collectives import dense
from sparsecoll.cores import share_cores
from sparsecoll.errors import (
    CollectiveTimeoutError,
    GroupAbortedError,
    GroupClosedError,
    InvalidArgumentError,
    SparseCollError,
)
from sparsecoll.rendezvous import Rendezvous, listen_host, resolve
from sparsecoll.topology import Topology
from sparsecoll.transport import transport_class
from sparsecoll.transport.base import Transport
from sparsecoll.transport.device import adopt_dlpack
from sparsecoll.transport.handshake import group_id_for
from sparsecoll.transport.mailbox import ANY_SOURCE, copy_error
from sparsecoll.wire import DEFAULT_MAX_PAYLOAD, Signature

DEFAULT_TIMEOUT = 300.0
"""Seconds a collective may wait on the network before CollectiveTimeoutError (per call)."""
BLAME_WINDOW = 1.0
"""Seconds a timed-out rank listens for the other ranks' waits before it names the rank that
stopped (see :meth:`Group._blame_stalled`)."""
BLAME_MIN_WAIT = 0.1
"""Seconds a receive must have waited for its rank to count as waiting on that peer: a rank
that stalled, then posts its receives and reads the abort at once, waits on nobody."""

T = TypeVar("T")

CANCELLATION_RULE = """Cancelling this call (``task.cancel()``, or ``asyncio.wait_for`` around it) poisons the
group on every rank, as in NCCL: the other ranks are inside the same call and cannot finish it.
For a deadline pass ``timeout=``, which fails every rank with CollectiveTimeoutError instead."""


def _poisons_when_cancelled(method: Callable) -> Callable:
    """Append :data:`CANCELLATION_RULE` to a collective's docstring: one text, in every
    docstring a user reads (``help``, the API reference)."""
    method.__doc__ = f"{inspect.cleandoc(method.__doc__ or '')}\n\n{CANCELLATION_RULE}"
    return method


class Group:
    """Rank, size, transport, sequence numbers and deadlines of one set of ranks."""

    def __init__(self, rank: int, size: int, transport: Transport, *, timeout: float,
                 backend: str, store: Any = None, name: str = "default", context: int = 0,
                 members: Sequence[int] | None = None, parent: Group | None = None) -> None:
        self.rank = rank
        self.size = size
        self.transport = transport
        self.timeout = timeout
        self.backend = backend
        self.store = store
        self.name = name
        self.context = context
        self.members: tuple[int, ...] = tuple(range(size) if members is None else members)
        """Rank in the whole job (the transport's rank) of each rank of this group."""
        self.parent = parent
        self.total_stats = CommStats()
        self._root: Group = self if parent is None else parent._root
        self._seq = 0
        self._children = 0
        self._error: SparseCollError | None = None
        self._closed = False
        self._topology: Topology | None = None
        self._host_keys: dict[int, int] = {}

    def __repr__(self) -> str:
        state = "closed" if self.closed else "failed" if self.error else "ready"
        return f"<Group {self.name!r} rank {self.rank}/{self.size} {self.backend} {state}>"

    @property
    def seq(self) -> int:
        """Number of collective calls started so far."""
        return self._seq

    @property
    def error(self) -> SparseCollError | None:
        """The failure that poisoned this group (and every group sharing its connections)."""
        return self._root._error

    @property
    def topology(self) -> Topology:
        """Which ranks share a host, and the intra-/inter-host sub-groups (see
        :mod:`sparsecoll.topology`); created on first access, filled by ``await
        group.topology.discover()``."""
        if self._topology is None:
            self._topology = Topology(self)
        return self._topology

    def learn_hosts(self, host_keys: dict[int, int]) -> None:
        """Record the host of transport ranks, so every later call of this group and of the
        groups sharing its connections counts bytes to other hosts apart
        (``CommStats.inter_host_bytes_sent``)."""
        self._root._host_keys.update(host_keys)

    @property
    def closed(self) -> bool:
        """True once this group, or the group it was split from, was closed."""
        return self._closed or self._root._closed

    # ----------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Group:
        return self

    async def __aexit__(self, exc_type, exc, traceback) -> None:
        if exc is not None and not isinstance(exc, SparseCollError) and not self._closed:
            self.abort(f"{type(exc).__name__} on rank {self.rank}")
        await self.close()

    def abort(self, reason: str = "") -> None:
        """Fail this group on every rank: the others raise GroupAbortedError promptly.

        Sub-groups share their parent's connections, so an abort (or any failure) in one
        fails the parent and all its sub-groups alike.
        """
        if self.closed:
            return
        self.poison(GroupAbortedError(f"group aborted by rank {self.rank}" + (f": {reason}" if reason else ""),
                                      rank=self.transport.rank))

    async def close(self, linger: float = 1.0) -> None:
        """Say goodbye to the peers and release sockets; later calls raise GroupClosedError.

        Closing a sub-group only retires it; closing the group that owns the connections
        retires every sub-group too.
        """
        if self._closed:
            return
        self._closed = True
        if self.parent is None:
            self.transport.mailbox.fail(GroupClosedError("group closed", rank=self.rank))
            await self.transport.close(linger)

    def poison(self, error: SparseCollError) -> None:
        """Record the first failure, fail every wait on it, and tell the other ranks."""
        root = self._root
        if root._error is not None or root._closed:
            return
        root._error = error
        transport = self.transport
        if isinstance(error, CollectiveTimeoutError) and error.origin is None and error.peer is not None:
            transport.waits[transport.rank] = error.peer  # our own deadline, waiting on error.peer
        else:
            transport.waits[transport.rank] = transport.mailbox.waiting_on(BLAME_MIN_WAIT)
        self.transport.mailbox.fail(error)
        self.transport.fail_pending_sends(error)
        self.transport.send_abort(error)

    async def _blame_stalled(self, error: CollectiveTimeoutError, timeout: float) -> CollectiveTimeoutError:
        """The timeout, naming the rank that stopped rather than the one this rank (or the
        rank whose deadline fired) happened to wait on.

        Every rank that fails sends, in its ABORT frame, whom it was waiting on; a rank
        that stalled sends nothing. Following those waits from the peer ``error`` blames
        ends at a rank that waits on nobody, or that never reported: the one that stopped.
        The waits are collected for at most ``BLAME_WINDOW`` seconds (less once every rank
        but one has reported).
        """
        transport = self.transport
        waits = await transport.learn_waits(min(BLAME_WINDOW, timeout))
        chain = [error.peer] if error.peer is not None else []
        while chain and chain[-1] in waits and waits[chain[-1]] is not None and waits[chain[-1]] not in chain:
            chain.append(waits[chain[-1]])
        stalled = chain[-1] if chain else None
        blamed = error
        if stalled is not None and stalled != error.peer:
            blamed = CollectiveTimeoutError(
                f"rank {stalled} stopped responding: {error.message} (ranks waiting on each other: "
                f"{' -> '.join(str(rank) for rank in chain)})", rank=error.rank, peer=stalled)
            blamed.origin = error.origin
        root = self._root
        if root._error is not None and isinstance(root._error, CollectiveTimeoutError):
            root._error = blamed
        return copy_error(blamed)

    def check_usable(self) -> None:
        """Raise GroupClosedError, or the error that poisoned the group, if it cannot be used."""
        if self.closed:
            raise GroupClosedError("the group is closed", rank=self.rank)
        if self.error is not None:
            raise copy_error(self.error)

    # ----------------------------------------------------------------- calls
    @_poisons_when_cancelled
    async def run(self, signature: Signature, body: Callable[[Call], Awaitable[T]],
                  timeout: float | None = None) -> CollectiveResult:
        """Run ``body`` as the next collective call of this group.

        This is the extension point for collectives: ``body`` receives a :class:`Call` whose
        frames carry ``signature``; its return value becomes ``CollectiveResult.value``.
        """
        self.check_usable()
        timeout = self.timeout if timeout is None else float(timeout)
        if timeout <= 0:
            raise InvalidArgumentError(f"timeout must be positive, got {timeout}", rank=self.rank)
        loop = asyncio.get_running_loop()
        seq = self._seq
        self._seq += 1
        call = Call(self.transport, self.rank, self.size, self.context, seq, signature,
                    loop.time() + timeout, timeout, self.members if self.parent else (),
                    host_keys=self._root._host_keys)
        mailbox = self.transport.mailbox
        mailbox.begin(self.context, seq, signature)
        started = time.perf_counter()
        try:
            value = await body(call)
        except SparseCollError as error:
            self.poison(error)
            if isinstance(error, CollectiveTimeoutError):
                raise await self._blame_stalled(error, timeout) from None
            raise
        except asyncio.CancelledError:
            self.poison(GroupAbortedError(f"collective #{seq} was cancelled on rank {self.rank}",
                                          rank=self.transport.rank))
            raise
        finally:
            mailbox.end(self.context, seq)
        if self.error is not None:
            raise copy_error(self.error)
        call.stats.seconds = time.perf_counter() - started
        self.total_stats += call.stats
        return CollectiveResult(value, call.stats)

    # ----------------------------------------------------------------- dense collectives
    @_poisons_when_cancelled
    async def allreduce(self, array: np.ndarray, op: str = "sum", *, out: np.ndarray | None = None,
                        timeout: float | None = None) -> CollectiveResult:
        """Element-wise reduction over all ranks (sum, mean, max, min, prod); ``out=array``
        reduces in place.
        """
        return await dense.allreduce(self, adopt_dlpack(array), op, out=adopt_dlpack(out), timeout=timeout)

    @_poisons_when_cancelled
    async def allgather(self, array: np.ndarray, *, out: np.ndarray | None = None,
                        timeout: float | None = None) -> CollectiveResult:
        """Every rank's equally shaped array, stacked: result shape ``(size, *array.shape)``."""
        return await dense.allgather(self, adopt_dlpack(array), out=adopt_dlpack(out), timeout=timeout)

    @_poisons_when_cancelled
    async def allgatherv(self, array: np.ndarray, *, counts: list[int] | None = None,
                         timeout: float | None = None) -> CollectiveResult:
        """Every rank's 1-D array of its own length; value is a list of ``size`` arrays
        (views into one contiguous buffer).
        """
        return await dense.allgatherv(self, adopt_dlpack(array), counts=counts, timeout=timeout)

    @_poisons_when_cancelled
    async def broadcast(self, array: np.ndarray, root: int = 0, *, out: np.ndarray | None = None,
                        timeout: float | None = None) -> CollectiveResult:
        """Root's array on every rank; other ranks pass an array of the same shape and dtype
        (``out=array`` receives in place).
        """
        return await dense.broadcast(self, adopt_dlpack(array), root, out=adopt_dlpack(out), timeout=timeout)

    @_poisons_when_cancelled
    async def barrier(self, *, timeout: float | None = None) -> CollectiveResult:
        """Return once every rank has entered the barrier."""
        return await dense.barrier(self, timeout=timeout)


    # ----------------------------------------------------------------- point to point
    async def send(self, array: np.ndarray, dst: int, tag: int = 0, *,
                   timeout: float | None = None) -> CommStats:
        """Send ``array`` to rank ``dst`` with ``tag`` (see :mod:`sparsecoll.p2p`).

        Cancelling it before its frame started leaves the group usable; once part of the frame
        is on the wire, a cancellation aborts the group (the stream cannot be resynchronized).
        """
        return await p2p.send(self, adopt_dlpack(array), dst, tag, timeout=timeout)

    async def recv(self, src: int = ANY_SOURCE, tag: int = 0, *, out: np.ndarray | None = None,
                   timeout: float | None = None) -> p2p.Message:
        """Receive the next message with ``tag`` from ``src`` (default: any rank).

        Cancelling it (or its deadline passing) withdraws the receive and leaves the group
        usable; ``out`` is the caller's again, and a message that arrives later waits for the
        next matching receive.
        """
        return await p2p.recv(self, src, tag, out=adopt_dlpack(out), timeout=timeout)

    def isend(self, array: np.ndarray, dst: int, tag: int = 0, *,
              timeout: float | None = None) -> asyncio.Task:
        """Start a send; returns a task (await it, or pass it to ``sparsecoll.wait_all``).

        Cancelling the task follows :meth:`send`'s rule.
        """
        return p2p.isend(self, adopt_dlpack(array), dst, tag, timeout=timeout)

    def irecv(self, src: int = ANY_SOURCE, tag: int = 0, *, out: np.ndarray | None = None,
              timeout: float | None = None) -> asyncio.Task:
        """Post a receive now; returns a task resolving to a :class:`~sparsecoll.p2p.Message`.

        Cancelling the task follows :meth:`recv`'s rule.
        """
        return p2p.irecv(self, src, tag, out=adopt_dlpack(out), timeout=timeout)

    # ----------------------------------------------------------------- sub-groups
    def new_group(self, ranks: Sequence[int], name: str | None = None) -> Group | None:
        """A group of ``ranks`` (renumbered 0.. in the order given) over the same connections.

        Every rank of this group must call it, in the same order relative to other
        ``new_group``/``split`` calls (as with torch's ``new_group``); ranks not listed get
        None. The sub-group has its own sequence numbers and tag space and runs concurrently
        with this group.
        """
        ranks = [int(rank) for rank in ranks]
        if not ranks or len(set(ranks)) != len(ranks) or not all(0 <= r < self.size for r in ranks):
            raise InvalidArgumentError(f"ranks {ranks} are not distinct ranks of a group of {self.size}",
                                       rank=self.rank)
        self.check_usable()
        index = self._children
        self._children += 1
        if self.rank not in ranks:
            return None
        return self._child(ranks, _child_context(self.context, index, ranks), name)

    @_poisons_when_cancelled
    async def split(self, color: int | None, key: int = 0, *, timeout: float | None = None) -> Group | None:
        """Split into one sub-group per ``color`` (None: join none), ranked by (key, rank).

        A collective over this group, like ``MPI_Comm_split``.
        """
        mine = np.array([-1 if color is None else int(color), int(key)], np.int64)
        if color is not None and color < 0:
            raise InvalidArgumentError(f"color must be >= 0 or None, got {color}", rank=self.rank)
        table, _ = await self.allgather(mine, timeout=timeout)
        index = self._children
        self._children += 1
        if color is None:
            return None
        ranks = sorted((r for r in range(self.size) if table[r, 0] == color), key=lambda r: (table[r, 1], r))
        return self._child(ranks, _child_context(self.context, index, [int(color)]), None)

    def _child(self, ranks: list[int], context: int, name: str | None) -> Group:
        return Group(ranks.index(self.rank), len(ranks), self.transport, timeout=self.timeout,
                     backend=self.backend, store=self.store, name=name or f"{self.name}/{context:08x}",
                     context=context, members=[self.members[r] for r in ranks], parent=self)

    # ----------------------------------------------------------------- sparse and compressed
    @_poisons_when_cancelled
    async def collective(self, name: str, array: np.ndarray, **options: Any) -> CollectiveResult:
        """Run the collective registered as ``name`` (see :mod:`sparsecoll.registry`)."""
        return await registry.collective(name)(self, adopt_dlpack(array), **options)

    @_poisons_when_cancelled
    async def reduce_gradient(self, grad: np.ndarray, algorithm: str = "gtopk", **options: Any) -> CollectiveResult:
        """Sum a gradient with the algorithm named by a string (dense, allgather, gtopk, sketch,
        cltk, or a registered one); see :mod:`sparsecoll.collectives.reduce`.
        """
        return await self.collective("reduce", grad, algorithm=algorithm, **options)

    @_poisons_when_cancelled
    async def sparse_allgather(self, grad: np.ndarray, **options: Any) -> CollectiveResult:
        """Every rank's top-k / threshold / random-k selection, summed (Aji & Heafield)."""
        return await self.collective("allgather", grad, **options)

    @_poisons_when_cancelled
    async def gtopk(self, grad: np.ndarray, **options: Any) -> CollectiveResult:
        """Global top-k by recursive doubling, O(k log P) per rank (Shi et al.)."""
        return await self.collective("gtopk", grad, **options)

    @_poisons_when_cancelled
    async def sketch_allreduce(self, grad: np.ndarray, **options: Any) -> CollectiveResult:
        """Top-k through summed count sketches, traffic independent of d (Ivkin et al.)."""
        return await self.collective("sketch", grad, **options)

    @_poisons_when_cancelled
    async def cltk(self, grad: np.ndarray, **options: Any) -> CollectiveResult:
        """The rotating leader's top-k indices, then a k-sized allreduce (ScaleCom)."""
        return await self.collective("cltk", grad, **options)


def _child_context(parent: int, index: int, identity: Sequence[int]) -> int:
    """A context id every member derives alike: parent, creation index, and what tells
    siblings apart. Nonzero, so it never equals a top-level group's context 0."""
    digest = zlib.crc32(np.asarray([parent, index, *identity], np.int64).tobytes())
    return digest or 1


async def init_group(*, rank: int | None = None, world_size: int | None = None, store: Any = None,
                     init_method: str | None = None, backend: str | None = None,
                     timeout: float | None = None, secret: bytes | str | None = None,
                     host: str | None = None, name: str = "default",
                     max_payload: int = DEFAULT_MAX_PAYLOAD, kernel_threads: int | None = None) -> Group:
    """Create a group: find the peers, connect and authenticate every pair.

    With no arguments it reads the environment torchrun sets (``env://``). ``store`` may be
    any ``torch.distributed.Store`` the caller already has. ``secret`` defaults to
    SPARSECOLL_SECRET, else to a random one shared through the store. ``timeout`` (default
    SPARSECOLL_TIMEOUT or 300 s) bounds the set-up and is every collective's default deadline.
    ``kernel_threads`` caps the compression kernels' threads; by default ranks that share a
    host share its cores (see :mod:`sparsecoll.cores`), and ``OMP_NUM_THREADS`` wins when set.
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
        share_cores(addresses, membership.rank, kernel_threads)
        await transport.connect(addresses, timeout)
    except BaseException:
        await transport.close(linger=0.1)
        raise
    group = Group(membership.rank, membership.world_size, transport, timeout=timeout,
                  backend=backend, store=membership.store, name=name)
    if transport.mailbox.error is not None:
        group.poison(transport.mailbox.error)
    return group
