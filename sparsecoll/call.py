"""One collective call in flight: the small API every collective algorithm is written on.

A :class:`Call` knows its group's transport, its sequence number, the signature every frame
carries, its deadline, and counts what it moves. Algorithms only ``send``, ``post`` and
``wait``; they never see sockets, and they never see torch.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from sparsecoll.errors import CollectiveTimeoutError, SparseCollError
from sparsecoll.transport.base import Buffer, Transport
from sparsecoll.transport.device import device_nbytes, is_device
from sparsecoll.transport.mailbox import PostedRecv
from sparsecoll.wire import HEADER_SIZE, FrameHeader, Kind, Signature


@dataclass(slots=True)
class CommStats:
    """What one call (or a sum of calls) moved, as seen by this rank."""

    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    rounds: int = 0
    seconds: float = 0.0
    inter_host_bytes_sent: int = 0
    """Of ``bytes_sent``, those to ranks on other hosts (counted once the group's topology is
    known: ``await group.topology.discover()``; the two-level collectives discover it)."""
    inter_host_bytes_received: int = 0
    """Of ``bytes_received``, those from ranks on other hosts (same rule)."""

    @property
    def intra_host_bytes_sent(self) -> int:
        """Of ``bytes_sent``, those to ranks on this rank's host (all of them while the
        topology is unknown)."""
        return self.bytes_sent - self.inter_host_bytes_sent

    @property
    def intra_host_bytes_received(self) -> int:
        """Of ``bytes_received``, those from ranks on this rank's host."""
        return self.bytes_received - self.inter_host_bytes_received

    def __iadd__(self, other: CommStats) -> CommStats:
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received
        self.inter_host_bytes_sent += other.inter_host_bytes_sent
        self.inter_host_bytes_received += other.inter_host_bytes_received
        self.frames_sent += other.frames_sent
        self.frames_received += other.frames_received
        self.rounds += other.rounds
        self.seconds += other.seconds
        return self


class CollectiveResult(NamedTuple):
    """The value a collective produced and what it cost: ``value, stats = await g.op(...)``."""

    value: Any
    stats: CommStats


@dataclass(slots=True)
class Call:
    """The context of one collective call on one rank."""

    transport: Transport
    rank: int
    size: int
    context: int
    seq: int
    signature: Signature
    deadline: float
    timeout: float
    members: tuple[int, ...] = ()
    """Transport rank of each rank of the group (a sub-group's ranks are renumbered from 0)."""
    stats: CommStats = field(default_factory=CommStats)
    host_keys: dict[int, int] = field(default_factory=dict)
    """Host of each transport rank, where known (:meth:`Group.learn_hosts`)."""

    def _remote(self, peer: int) -> bool:
        """Whether transport rank ``peer`` is known to sit on another host than this rank."""
        mine = self.host_keys.get(self.transport.rank)
        return mine is not None and peer in self.host_keys and self.host_keys[peer] != mine

    async def send(self, peer: int, tag: int, *buffers: Buffer | np.ndarray) -> None:
        """Send one frame made of ``buffers`` to ``peer`` under this call's deadline."""
        buffers = tuple(as_exportable(buffer) for buffer in buffers)
        length = sum(_nbytes(buffer) for buffer in buffers)
        header = FrameHeader(Kind.DATA, self.context, self.seq, tag, length, self.signature)
        peer = self.members[peer] if self.members else peer
        await self.transport.send(peer, header, buffers, deadline=self.deadline,
                                  timeout_error=lambda: self._timeout(peer, f"sending {length} bytes (tag {tag})"))
        self.stats.bytes_sent += HEADER_SIZE + length
        self.stats.frames_sent += 1
        if self._remote(peer):
            self.stats.inter_host_bytes_sent += HEADER_SIZE + length

    def post(self, peer: int, tag: int, out: np.ndarray | memoryview | None = None,
             limit: int | None = None) -> PostedRecv:
        """Post a receive from ``peer``; with ``out`` the payload lands in it directly, without
        it into a new buffer of at most ``limit`` bytes."""
        view = None
        if out is not None:
            view = memoryview(as_exportable(out))
            if view.ndim != 1 or view.format != "B":
                view = view.cast("B")
        if self.members and peer >= 0:
            peer = self.members[peer]
        return self.transport.mailbox.post(peer, (self.context, self.seq, tag), view, self.signature,
                                           limit)

    async def wait(self, posted: PostedRecv) -> memoryview:
        """Wait for a posted receive; returns the payload bytes. However the wait ends
        (failure, deadline, cancellation), ``out`` is the caller's again when this returns."""
        try:
            async with asyncio.timeout_at(self.deadline):
                _header, payload = await posted.future
        except SparseCollError:
            await self.transport.mailbox.release(posted)
            raise
        except TimeoutError:
            await self.transport.mailbox.release(posted)
            raise self._timeout(posted.peer, f"waiting for frame tag {posted.key[2]}") from None
        except asyncio.CancelledError:
            await self.transport.mailbox.release(posted)
            raise
        self.stats.bytes_received += HEADER_SIZE + len(payload)
        self.stats.frames_received += 1
        if self._remote(posted.peer):
            self.stats.inter_host_bytes_received += HEADER_SIZE + len(payload)
        return payload

    async def recv(self, peer: int, tag: int, out: np.ndarray | memoryview | None = None,
                   limit: int | None = None) -> memoryview:
        """Post and wait in one step."""
        return await self.wait(self.post(peer, tag, out, limit))

    async def exchange(self, send_peer: int, send_buffers: Buffer | np.ndarray | list, recv_peer: int,
                       out: np.ndarray | memoryview | None, tag: int, limit: int | None = None) -> memoryview:
        """Send to one peer while receiving from another (the receive is posted first)."""
        posted = self.post(recv_peer, tag, out, limit)
        buffers = send_buffers if isinstance(send_buffers, list) else [send_buffers]
        try:
            await self.send(send_peer, tag, *buffers)
        except BaseException:
            await self.transport.mailbox.release(posted)
            raise
        return await self.wait(posted)

    def _timeout(self, peer: int, doing: str) -> SparseCollError:
        return CollectiveTimeoutError(
            f"collective #{self.seq} {self.signature.describe()}: rank {self.transport.rank}'s "
            f"deadline of {self.timeout:.3g} s passed {doing} with rank {peer}",
            rank=self.transport.rank, peer=peer)


def as_exportable(buffer: Buffer | np.ndarray) -> Buffer | np.ndarray:
    """The same bytes as a buffer Python can export: ml_dtypes' bfloat16 arrays (dtype kind 'V',
    which ``memoryview`` refuses) as uint8; anything else as it is."""
    if isinstance(buffer, np.ndarray) and buffer.dtype.kind == "V" and buffer.dtype.fields is None:
        return buffer.reshape(-1).view(np.uint8)
    return buffer


def _nbytes(buffer: Buffer | np.ndarray) -> int:
    if isinstance(buffer, np.ndarray):
        return buffer.nbytes
    if is_device(buffer):
        return device_nbytes(buffer)  # from its interface: memoryview cannot see device memory
    return memoryview(buffer).nbytes
