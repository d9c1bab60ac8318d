"""The interface every transport implements: frames to and from peers, nothing more.

A transport knows ranks, frames and buffers; it knows nothing of collectives or gradients.
Incoming frames are matched by the transport's :class:`~sparsecoll.transport.mailbox.Mailbox`,
which the layer above uses to post receives. Lifecycle::

    transport = SomeTransport(rank, size, secret=..., group_id=..., on_failure=...)
    address = await transport.listen(host)          # publish it through the rendezvous store
    await transport.connect(addresses, timeout)     # every pair authenticated, mesh complete
    ... send / mailbox.post ...
    await transport.close()

Buffer ownership (Gloo's rule, which every transport keeps):

* a **receive** buffer (``out`` of a posted receive) belongs to the transport from the
  moment a frame's header claims the receive until the receive returns, fails or is
  withdrawn (cancelled, timed out, or failed by a poisoned group). After a withdrawal the
  transport writes the rest of that payload into private memory (the prefix already
  received is copied there), never into the caller's buffer; see
  :meth:`~sparsecoll.transport.mailbox.Mailbox.release`. A claimed receive leaves the match
  queue at once, so a second frame for the same key never lands in the same buffer.
* a **send** buffer belongs to the transport until :meth:`Transport.send` returns or
  raises (a cancellation included): once it has, the caller may overwrite it at once, and
  nothing of it is read again.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from sparsecoll.errors import (
    AuthenticationError,
    CollectiveTimeoutError,
    GroupAbortedError,
    InvalidArgumentError,
    PeerLostError,
    SparseCollError,
)
from sparsecoll.transport.mailbox import Mailbox, copy_error, lost_peer_error
from sparsecoll.wire import DEFAULT_MAX_PAYLOAD, FrameHeader, Kind

Buffer = bytes | bytearray | memoryview
"""Anything exposing a contiguous buffer (numpy arrays included)."""

log = logging.getLogger(__name__)

MAX_REJECTED = 64
"""Dropped connections whose errors a transport keeps in ``rejected`` (a flood keeps counting)."""
LOST_PEER_GRACE = 0.1
"""Seconds between a connection's loss and the failure it causes (see ``peer_lost``)."""
LOG_INTERVAL = 10.0
"""Seconds between two warnings about dropped connections or failed accepts."""


def port_range() -> range | None:
    """The ports listeners may bind, from ``SPARSECOLL_PORT_RANGE`` ("29500-29600", or one
    port "29500"); None (any free port) when unset. A malformed or impossible value raises
    InvalidArgumentError."""
    setting = os.environ.get("SPARSECOLL_PORT_RANGE", "").strip()
    if not setting:
        return None
    first, _, last = setting.partition("-")
    try:
        low, high = int(first), int(last or first)
    except ValueError:
        raise InvalidArgumentError(
            f"SPARSECOLL_PORT_RANGE={setting!r}: expected FIRST-LAST, e.g. 29500-29600") from None
    if not 1 <= low <= high <= 65535:
        raise InvalidArgumentError(
            f"SPARSECOLL_PORT_RANGE={setting!r}: need 1 <= FIRST <= LAST <= 65535")
    return range(low, high + 1)


class Throttled:
    """A warning logged at once, then at most once per ``interval`` seconds with a count of
    what was left out (a flood of strays or failing accepts cannot flood the log)."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self.count = 0
        self._unlogged = 0
        self._next = 0.0

    def warn(self, message: str, *args: Any) -> None:
        self.count += 1
        self._unlogged += 1
        now = time.monotonic()
        if now < self._next:
            return
        more = f" ({self._unlogged - 1} more since the last warning)" if self._unlogged > 1 else ""
        log.warning(message + more, *args)
        self._unlogged = 0
        self._next = now + self.interval


class Transport(abc.ABC):
    """Moves frames between this rank and every other rank of one group."""

    def __init__(self, rank: int, size: int, *, secret: bytes, group_id: bytes,
                 on_failure: Callable[[SparseCollError], None],
                 max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.rank = rank
        self.size = size
        self.secret = secret
        self.group_id = group_id
        self.max_payload = max_payload
        self.on_failure = on_failure
        self.mailbox = Mailbox(rank, max_payload, 4 * max_payload, on_failure)
        self.rejected: list[SparseCollError] = []
        """Errors of the first connections dropped before they proved the secret (strays)."""
        self.strays = Throttled()
        """Counts (``strays.count``) and logs the dropped connections."""
        self._refused: dict[int, SparseCollError] = {}
        """The last failed authentication of a connection that claimed each rank."""
        self.waits: dict[int, int | None] = {}
        """Whom each rank (this one included) was waiting on when the group failed."""
        self._waits_changed: asyncio.Event | None = None
        self._connections: dict[int, object] = {}
        self._mesh_changed: asyncio.Event | None = None

    def receives_device_memory(self) -> bool:
        """Whether a payload can land straight in a device receive buffer (UCX with a CUDA
        transport); otherwise it lands in host memory and is copied there."""
        return False

    @abc.abstractmethod
    async def listen(self, host: str) -> str:
        """Start accepting peers; returns the address other ranks connect to.

        Raises RendezvousError if no listener can be opened on ``host``.
        """

    @abc.abstractmethod
    async def connect(self, addresses: Sequence[str], timeout: float) -> None:
        """Open and authenticate one connection to every other rank.

        Raises AuthenticationError (a peer's secret differs), RendezvousError or
        CollectiveTimeoutError (the mesh was not complete within ``timeout``).
        """

    async def send(self, peer: int, header: FrameHeader, payload: Sequence[Buffer] = (), *,
                   deadline: float | None = None,
                   timeout_error: Callable[[], SparseCollError] | None = None) -> None:
        """Send one frame to ``peer``; returns (or raises) when the buffers may be reused.

        Raises PeerLostError if the connection is gone, and ``timeout_error()`` (by default a
        CollectiveTimeoutError naming ``peer``) once the loop time passes ``deadline``. A
        send cut off after part of its frame reached the wire leaves the connection unusable
        for data, so the group is poisoned with the cause: the timeout error for a deadline,
        GroupAbortedError for a cancellation.
        """
        connection = self._connections.get(peer)
        if connection is None or connection.closed and not connection.bye_received:
            raise lost_peer_error(self.rank, peer, "no open connection")
        try:
            async with asyncio.timeout_at(deadline):
                await self._send_frame(connection, header, payload)
        except SparseCollError:
            raise
        except TimeoutError:
            error = timeout_error() if timeout_error is not None else CollectiveTimeoutError(
                f"sending {header.length} bytes passed the deadline", rank=self.rank, peer=peer)
            if connection.tx_broken:
                self.on_failure(copy_error(error))
            raise error from None
        except asyncio.CancelledError:
            if connection.tx_broken:
                self.on_failure(GroupAbortedError(
                    f"a send to rank {peer} was cancelled mid-frame; the connection cannot be "
                    "resynchronized", rank=self.rank, peer=peer))
            raise

    @abc.abstractmethod
    async def _send_frame(self, connection: Any, header: FrameHeader, payload: Sequence[Buffer]) -> None:
        """Put one frame on ``connection``; set ``connection.tx_broken`` if it is cut off
        mid-frame. Returns (or raises) only when the payload buffers are no longer read."""

    def on_abort(self, peer: int, error: SparseCollError, header: FrameHeader) -> None:
        """``peer`` reported that the group failed with ``error`` (an ABORT frame); its tag
        says whom ``peer`` was waiting on when it failed (see :meth:`abort_header`)."""
        self.waits[peer] = header.tag - 1 if 0 < header.tag <= self.size else None
        error.origin = peer if error.origin is None else error.origin
        self.on_failure(error)
        if self._waits_changed is not None:
            self._waits_changed.set()

    def abort_header(self, length: int) -> FrameHeader:
        """The header of this rank's ABORT frame: its tag is 1 + the rank this rank was
        waiting on when the group failed (0: none), so that every rank can follow the chain
        of waits to the rank that stopped."""
        waiting_on = self.waits.get(self.rank)
        return FrameHeader(kind=Kind.ABORT, context=0, seq=0, tag=0 if waiting_on is None else waiting_on + 1,
                           length=length)

    async def learn_waits(self, window: float) -> dict[int, int | None]:
        """Whom each rank was waiting on when the group failed, as far as the ABORT frames
        received within ``window`` seconds tell (a stalled rank sends none): returns early
        once every rank but one has reported."""
        if self._waits_changed is None:
            self._waits_changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + window
        while len(self.waits) < self.size - 1 and loop.time() < deadline:
            self._waits_changed.clear()
            try:
                await asyncio.wait_for(self._waits_changed.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                break
        return dict(self.waits)

    @abc.abstractmethod
    def send_abort(self, error: SparseCollError) -> None:
        """Tell every reachable peer that this group failed with ``error``; never blocks."""

    @abc.abstractmethod
    def fail_pending_sends(self, error: SparseCollError) -> None:
        """Wake every send blocked on flow control with ``error`` (the group is poisoned)."""

    @abc.abstractmethod
    async def close(self, linger: float = 1.0) -> None:
        """Say goodbye to every peer, wait up to ``linger`` seconds for theirs, release all."""

    def drop_stray(self, error: SparseCollError) -> None:
        """An incoming connection failed before it proved the secret: it touches nothing.

        Whoever can reach the port can send a well-formed HELLO that names a real rank and
        then hang up or refuse the proof; only a proof counts, so the genuine rank can still
        connect. A refused proof is remembered, to explain a mesh that stays incomplete.
        """
        if len(self.rejected) < MAX_REJECTED:
            self.rejected.append(error)
        if isinstance(error, AuthenticationError) and error.peer is not None:
            self._refused[error.peer] = error
        self.strays.warn("rank %d dropped a connection that did not prove the secret: %s", self.rank, error)

    def peer_lost(self, peer: int, detail: str) -> None:
        """``peer``'s connection is gone: fail what waits for it and poison the group.

        This happens ``LOST_PEER_GRACE`` seconds later: a connection is often cut because of
        a failure that another rank already reported (a deadline that passed mid-frame), and
        that report, in flight on another connection, names the cause."""
        error = lost_peer_error(self.rank, peer, detail)
        asyncio.get_running_loop().call_later(LOST_PEER_GRACE, self._report_lost, peer, error)

    def _report_lost(self, peer: int, error: PeerLostError) -> None:
        self.mailbox.peer_closed(peer, error)
        self.on_failure(error)
        if self._mesh_changed is not None:
            self._mesh_changed.set()

    async def _wait_for_mesh(self, outgoing: list[asyncio.Task], deadline: float, timeout: float) -> None:
        """Return once every peer is connected; raise the first failure or a timeout.

        ``outgoing`` are the tasks connecting to lower ranks; higher ranks arrive through the
        listener, which adds to ``_connections`` and sets ``_mesh_changed``.
        """
        loop = asyncio.get_running_loop()
        while True:
            for task in outgoing:
                if task.done() and task.exception() is not None:
                    raise task.exception()
            if len(self._connections) == self.size - 1 and all(task.done() for task in outgoing):
                return  # an abort that arrived meanwhile fails the group's first call
            # a lost peer ends the wait; a collective failure reported by peers that finished
            # their set-up first does not stop the mesh from completing (the first call raises it)
            if isinstance(self.mailbox.error, PeerLostError):
                raise copy_error(self.mailbox.error)
            remaining = deadline - loop.time()
            if remaining <= 0:
                missing = sorted(set(range(self.size)) - set(self._connections) - {self.rank})
                refused = [peer for peer in missing if peer in self._refused]
                if refused:
                    raise AuthenticationError(
                        f"mesh incomplete after {timeout:.1f} s: every connection claiming rank "
                        f"{refused[0]} failed authentication ({self._refused[refused[0]].message})",
                        rank=self.rank, peer=refused[0])
                raise CollectiveTimeoutError(
                    f"mesh incomplete after {timeout:.1f} s; no connection with ranks {missing}",
                    rank=self.rank, peer=missing[0] if missing else None)
            self._mesh_changed.clear()
            waiter = asyncio.ensure_future(self._mesh_changed.wait())
            await asyncio.wait([waiter, *(task for task in outgoing if not task.done())],
                               timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
