"""Matching of incoming frames to posted receives, shared by every transport.

A receive is posted for (peer, context, seq, tag), optionally with the buffer the payload
must land in; a frame that arrives for it is read straight into that buffer. A frame that
arrives before its receive is posted is kept (up to a byte budget) until it is asked for.
Every frame's signature is compared with the receiver's own call before its payload is
accepted, so ranks running different collectives fail with ``CollectiveMismatchError``
instead of mixing their data.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sparsecoll.errors import (
    CollectiveMismatchError,
    FrameError,
    FrameTooLargeError,
    PeerLostError,
    SparseCollError,
)
from sparsecoll.wire import FrameHeader, Signature

MatchKey = tuple[int, int, int]  # (context, seq, tag)
ANY_SOURCE = -1


def copy_error(error: SparseCollError) -> SparseCollError:
    """A fresh instance of ``error`` so that each waiter raises its own exception object."""
    return type(error)(error.message, rank=error.rank, peer=error.peer)


@dataclass(eq=False)
class PostedRecv:
    """A receive waiting for its frame; ``future`` resolves to (header, payload buffer)."""

    peer: int
    key: MatchKey
    signature: Signature | None
    out: memoryview | None
    future: asyncio.Future = field(repr=False)
    source: int = -1
    """The peer the matched frame came from (for receives posted with ANY_SOURCE)."""
    limit: int | None = None
    """Largest payload a receive without ``out`` accepts (what the collective can need)."""

    @property
    def done(self) -> bool:
        return self.future.done()


@dataclass(eq=False)
class _Pending:
    """A frame that arrived before anybody asked for it."""

    header: FrameHeader
    payload: bytearray
    arrival: int


class Mailbox:
    """Per-rank matching engine: posted receives, unexpected frames, and the failure state."""

    def __init__(self, rank: int, max_payload: int, max_unexpected_bytes: int,
                 on_failure: Callable[[SparseCollError], None]) -> None:
        self.rank = rank
        self.max_payload = max_payload
        self.max_unexpected_bytes = max_unexpected_bytes
        self._on_failure = on_failure
        self._posted: dict[tuple[int, MatchKey], deque[PostedRecv]] = {}
        self._unexpected: dict[tuple[int, MatchKey], deque[_Pending]] = {}
        self._unexpected_bytes = 0
        self._active: dict[tuple[int, int], Signature] = {}
        self._closed_peers: dict[int, SparseCollError] = {}
        self._streaming: dict[int, PostedRecv | None] = {}
        self._arrivals = 0
        self.error: SparseCollError | None = None

    # ----------------------------------------------------------------- receiver side
    def post(self, peer: int, key: MatchKey, out: memoryview | None = None,
             signature: Signature | None = None, limit: int | None = None) -> PostedRecv:
        """Ask for the next frame from ``peer`` (or ANY_SOURCE) matching ``key``; returns at once."""
        loop = asyncio.get_running_loop()
        posted = PostedRecv(peer, key, signature, out, loop.create_future(), limit=limit)
        if self.error is not None:
            posted.future.set_exception(copy_error(self.error))
            return posted
        source = self._earliest_unexpected(key) if peer == ANY_SOURCE else peer
        queued = self._unexpected.get((source, key))
        if queued:
            pending = queued.popleft()
            if not queued:
                del self._unexpected[(source, key)]
            self._unexpected_bytes -= len(pending.payload)
            self._deliver_pending(source, posted, pending)
            return posted
        if peer in self._closed_peers:
            posted.future.set_exception(copy_error(self._closed_peers[peer]))
            return posted
        self._posted.setdefault((peer, key), deque()).append(posted)
        return posted

    def _earliest_unexpected(self, key: MatchKey) -> int:
        """The peer whose oldest kept frame for ``key`` arrived first, or ANY_SOURCE."""
        best, best_arrival = ANY_SOURCE, None
        for (peer, frame_key), queue in self._unexpected.items():
            if frame_key == key and (best_arrival is None or queue[0].arrival < best_arrival):
                best, best_arrival = peer, queue[0].arrival
        return best

    def _deliver_pending(self, source: int, posted: PostedRecv, pending: _Pending) -> None:
        try:
            self._check(source, posted, pending.header)
        except SparseCollError as error:
            posted.future.set_exception(error)
            self._on_failure(copy_error(error))
            return
        posted.source = source
        length = len(pending.payload)
        if posted.out is not None:
            posted.out[:length] = pending.payload
            posted.future.set_result((pending.header, posted.out[:length]))
        else:
            posted.future.set_result((pending.header, memoryview(pending.payload)))

    def cancel(self, posted: PostedRecv) -> None:
        """Withdraw a receive that nobody waits for any more."""
        self._unpost(posted)
        if not posted.future.done():
            posted.future.cancel()
        elif not posted.future.cancelled():
            posted.future.exception()  # a failure nobody will await: mark it seen

    def begin(self, context: int, seq: int, signature: Signature) -> None:
        """Declare the collective this rank runs as (context, seq), and check early arrivals."""
        self._active[(context, seq)] = signature
        for (peer, (ctx, frame_seq, _tag)), queue in list(self._unexpected.items()):
            if ctx == context and frame_seq == seq and queue[0].header.signature != signature:
                self._fail_mismatch(peer, signature, queue[0].header.signature, seq)
                return

    def end(self, context: int, seq: int) -> None:
        """The collective (context, seq) finished on this rank."""
        self._active.pop((context, seq), None)

    # ----------------------------------------------------------------- transport side
    def on_header(self, peer: int, header: FrameHeader) -> memoryview | None:
        """Where the payload of ``header`` goes: a posted buffer, a new buffer, or None to drop.

        Called by the transport after the header is decoded and before any payload byte is
        read, so every limit is enforced before allocation. A peer's frames arrive one at a
        time, so the mailbox remembers, per peer, which receive the streaming payload is for.
        """
        if self.error is not None:
            return None
        key = (header.context, header.seq, header.tag)
        queue = self._posted.get((peer, key)) or self._posted.get((ANY_SOURCE, key))
        if queue:
            posted = queue[0]
            try:
                self._check(peer, posted, header)
            except SparseCollError as error:
                self._on_failure(error)
                return None
            self._streaming[peer] = posted
            if posted.out is not None:
                return posted.out[:header.length]
            return memoryview(bytearray(header.length))
        active = self._active.get((header.context, header.seq))
        if active is not None and active != header.signature:
            self._fail_mismatch(peer, active, header.signature, header.seq)
            return None
        if self._unexpected_bytes + header.length > self.max_unexpected_bytes:
            self._on_failure(FrameTooLargeError(
                f"{self._unexpected_bytes + header.length} bytes of unrequested frames "
                f"exceed the budget of {self.max_unexpected_bytes}", rank=self.rank, peer=peer))
            return None
        self._unexpected_bytes += header.length
        self._streaming[peer] = None
        return memoryview(bytearray(header.length))

    def on_payload(self, peer: int, header: FrameHeader, payload: memoryview) -> None:
        """The payload of ``header`` is complete in the buffer ``on_header`` returned."""
        target = self._streaming.pop(peer, None)
        if self.error is not None:
            return
        key = (header.context, header.seq, header.tag)
        if target is not None:
            self._unpost(target)
            if not target.future.done():
                target.source = peer
                target.future.set_result((header, payload))
                return
            # its receive was withdrawn while the payload streamed into the caller's buffer
            payload = memoryview(bytearray(payload))
            self._unexpected_bytes += header.length
        queue = self._posted.get((peer, key)) or self._posted.get((ANY_SOURCE, key))
        if queue:
            # a receive was posted while this unrequested payload was streaming in
            posted = queue[0]
            self._unpost(posted)
            self._unexpected_bytes -= header.length
            self._deliver_pending(peer, posted, _Pending(header, payload.obj, 0))
            return
        self._arrivals += 1
        self._unexpected.setdefault((peer, key), deque()).append(
            _Pending(header, payload.obj, self._arrivals))

    def _unpost(self, posted: PostedRecv) -> None:
        queue = self._posted.get((posted.peer, posted.key))
        if queue and posted in queue:
            queue.remove(posted)
            if not queue:
                del self._posted[(posted.peer, posted.key)]

    def peer_closed(self, peer: int, error: SparseCollError) -> None:
        """``peer`` will send nothing more: fail the receives that wait for it."""
        self._closed_peers.setdefault(peer, error)
        for (posted_peer, key), queue in list(self._posted.items()):
            if posted_peer != peer:
                continue
            del self._posted[(posted_peer, key)]
            for posted in queue:
                if not posted.future.done():
                    posted.future.set_exception(copy_error(error))

    def fail(self, error: SparseCollError) -> None:
        """Poison the mailbox: every waiting and future receive raises ``error``."""
        if self.error is None:
            self.error = error
        for queue in self._posted.values():
            for posted in queue:
                if not posted.future.done():
                    posted.future.set_exception(copy_error(self.error))
        self._posted.clear()
        self._unexpected.clear()
        self._unexpected_bytes = 0

    # ----------------------------------------------------------------- checks
    def _check(self, peer: int, posted: PostedRecv, header: FrameHeader) -> None:
        if posted.signature is not None and header.signature != posted.signature:
            raise self._mismatch(peer, posted.signature, header.signature, header.seq)
        if posted.limit is not None and header.length > posted.limit:
            raise FrameTooLargeError(
                f"frame of {header.length} bytes where the collective needs at most {posted.limit}",
                rank=self.rank, peer=peer)
        if posted.out is not None and header.length > len(posted.out):
            raise FrameTooLargeError(
                f"frame of {header.length} bytes for a receive of {len(posted.out)} bytes",
                rank=self.rank, peer=peer)
        if posted.out is not None and posted.signature is not None and header.length != len(posted.out):
            raise FrameError(
                f"frame of {header.length} bytes where the collective expects {len(posted.out)}",
                rank=self.rank, peer=peer)

    def _mismatch(self, peer: int, mine: Signature, theirs: Signature, seq: int) -> CollectiveMismatchError:
        return CollectiveMismatchError(
            f"collective #{seq}: rank {self.rank} called {mine.describe()} but rank {peer} called "
            f"{theirs.describe()}", rank=self.rank, peer=peer)

    def _fail_mismatch(self, peer: int, mine: Signature, theirs: Signature, seq: int) -> None:
        self._on_failure(self._mismatch(peer, mine, theirs, seq))


def lost_peer_error(rank: int, peer: int, detail: str) -> PeerLostError:
    """The error every rank raises when ``peer`` disappears."""
    return PeerLostError(f"lost connection to peer {peer}: {detail}", rank=rank, peer=peer)
