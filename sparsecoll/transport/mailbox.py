"""Matching of incoming frames to posted receives, shared by every transport.

A receive is posted for (peer, context, seq, tag), optionally with the buffer the payload
must land in; a frame that arrives for it is read straight into that buffer. A frame that
arrives before its receive is posted is kept (up to a byte budget) until it is asked for.

Buffer ownership (Gloo's rule): the caller's ``out`` belongs to the transport from the
moment a header claims its receive until the receive completes, fails or is withdrawn
(cancelled, timed out, poisoned), and not a moment longer. A header claims a posted receive
by leaving the match queue at once, so a second frame for the same key (another sender's,
for ANY_SOURCE) never lands in the same buffer. When a receive is withdrawn while its payload
streams in, the :class:`Landing` copies the prefix already received into a private buffer and
the transport writes the rest there; the complete message is then kept for the next
matching receive, and nothing is ever copied back out of the caller's buffer.
Every frame's signature is compared with the receiver's own call before its payload is
accepted, so ranks running different collectives fail with ``CollectiveMismatchError``
instead of mixing their data.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sparsecoll.errors import (
    CollectiveMismatchError,
    FrameError,
    FrameTooLargeError,
    GroupAbortedError,
    PeerLostError,
    SparseCollError,
)
from sparsecoll.transport.device import is_device, stage_to_host, write_bytes
from sparsecoll.wire import FrameHeader, Signature

MatchKey = tuple[int, int, int]  # (context, seq, tag)
ANY_SOURCE = -1
RELEASE_GRACE = 5.0
"""Seconds a withdrawn receive waits for a hardware transfer into its buffer to end."""


def copy_error(error: SparseCollError) -> SparseCollError:
    """A fresh instance of ``error`` so that each waiter raises its own exception object."""
    copy = type(error)(error.message, rank=error.rank, peer=error.peer)
    copy.origin = error.origin
    return copy


def _fail_future(future: asyncio.Future, error: BaseException) -> None:
    """Fail ``future`` and mark its error seen: a receive an algorithm posted for a later
    step, and never awaited because an earlier step failed, must not be reported as
    "Future exception was never retrieved" (whoever awaits it still gets the error)."""
    if not future.done():
        future.set_exception(error)
        future.exception()


def copy_out(view: Any) -> Any:
    """``view``'s bytes where a host buffer can take them: itself, or a host copy of a device
    receive buffer's (a transport that moves device memory writes into those)."""
    return stage_to_host(view) if is_device(view) and len(view) else view


class Landing:
    """Where one frame's payload is written while it streams in.

    ``view`` is the caller's buffer (a claimed receive with ``out``) or private memory.
    Transports write at ``view[filled:]`` and advance ``filled``, and read ``view`` anew
    before each write, so :meth:`withdraw` can move the rest of the payload elsewhere.
    A transport that hands part of the caller's buffer to hardware (UCX) sets ``in_flight``
    for the duration and resolves it once it no longer writes there.
    """

    __slots__ = ("view", "filled", "private", "in_flight")

    def __init__(self, view: memoryview, private: bool) -> None:
        self.view = view
        self.filled = 0
        self.private = private
        self.in_flight: asyncio.Future | None = None

    def withdraw(self) -> None:
        """Stop writing into the caller's buffer: the received prefix moves to private memory."""
        if self.private:
            return
        private = memoryview(bytearray(len(self.view)))
        private[:self.filled] = copy_out(self.view[:self.filled])
        self.view = private
        self.private = True


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
    landing: Landing | None = None
    """Set while a claimed frame's payload streams into this receive."""
    posted_at: float = 0.0
    """Loop time at which the receive was posted."""

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
        posted = PostedRecv(peer, key, signature, out, loop.create_future(), limit=limit,
                            posted_at=loop.time())
        if self.error is not None:
            _fail_future(posted.future, copy_error(self.error))
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
            _fail_future(posted.future, copy_error(self._closed_peers[peer]))
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
            _fail_future(posted.future, error)
            self._on_failure(copy_error(error))
            return
        posted.source = source
        length = len(pending.payload)
        if posted.out is not None:
            if is_device(posted.out):  # it arrived before the receive: host memory to the device
                write_bytes(posted.out[:length], pending.payload)
            else:
                posted.out[:length] = pending.payload
            posted.future.set_result((pending.header, posted.out[:length]))
        else:
            posted.future.set_result((pending.header, memoryview(pending.payload)))

    def cancel(self, posted: PostedRecv) -> None:
        """Withdraw a receive that nobody waits for any more; from now on the transport
        writes nothing into its buffer (see :meth:`release` for transports that need a wait)."""
        self._unpost(posted)
        if posted.landing is not None:
            posted.landing.withdraw()
        if not posted.future.done():
            posted.future.cancel()
        elif not posted.future.cancelled():
            posted.future.exception()  # a failure nobody will await: mark it seen

    async def release(self, posted: PostedRecv, grace: float = RELEASE_GRACE) -> None:
        """Withdraw ``posted`` and return once no transfer writes into its buffer any more.

        The receive's owner calls this when it stops waiting (failure, timeout, cancel).
        Only a transport that handed part of the buffer to hardware makes it wait, for that
        transfer to end; one that does not end within ``grace`` seconds poisons the group.
        """
        self.cancel(posted)
        landing = posted.landing
        if landing is None or landing.in_flight is None or landing.in_flight.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(landing.in_flight), grace)
        except asyncio.TimeoutError:
            self._on_failure(GroupAbortedError(
                f"a withdrawn receive's transfer did not end within {grace:.3g} s", rank=self.rank))

    def waiting_on(self, min_age: float) -> int | None:
        """The peer of a receive that has waited at least ``min_age`` seconds for a named
        peer's frame, if any. A rank that only just posted its receives (it was itself
        late, or stalled) is waiting on nobody as far as blame goes."""
        oldest = asyncio.get_running_loop().time() - min_age
        for posted in self._streaming.values():
            if posted is not None and not posted.future.done() and posted.posted_at <= oldest:
                return posted.source
        for (peer, _key), queue in self._posted.items():
            if peer != ANY_SOURCE and any(not posted.future.done() and posted.posted_at <= oldest
                                          for posted in queue):
                return peer
        return None

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
    def on_header(self, peer: int, header: FrameHeader) -> Landing | None:
        """Where the payload of ``header`` goes: a claimed receive's buffer, a new buffer, or
        None to drop it.

        Called by the transport after the header is decoded and before any payload byte is
        read, so every limit is enforced before allocation. The receive a header claims
        leaves the match queue at once. A peer's frames arrive one at a time, so the mailbox
        remembers, per peer, which receive the streaming payload is for.
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
            self._unpost(posted)
            posted.source = peer
            if posted.out is not None:
                posted.landing = Landing(posted.out[:header.length], private=False)
            else:
                posted.landing = Landing(memoryview(bytearray(header.length)), private=True)
            self._streaming[peer] = posted
            return posted.landing
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
        return Landing(memoryview(bytearray(header.length)), private=True)

    def on_payload(self, peer: int, header: FrameHeader, landing: Landing) -> None:
        """The payload of ``header`` is complete in ``landing``."""
        target = self._streaming.pop(peer, None)
        if self.error is not None:
            return
        key = (header.context, header.seq, header.tag)
        if target is not None:
            target.landing = None
            if not target.future.done():
                target.future.set_result((header, landing.view))
                return
            # its receive was withdrawn while the payload streamed in (or its waiter was
            # cancelled and has not withdrawn it yet): the message moves to private memory
            # and waits for the next matching receive
            landing.withdraw()
            self._unexpected_bytes += header.length
        payload = landing.view
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
        streaming = self._streaming.pop(peer, None)
        if streaming is not None:
            self._fail_streaming(streaming, error)
        for (posted_peer, key), queue in list(self._posted.items()):
            if posted_peer != peer:
                continue
            del self._posted[(posted_peer, key)]
            for posted in queue:
                _fail_future(posted.future, copy_error(error))

    def fail(self, error: SparseCollError) -> None:
        """Poison the mailbox: every waiting and future receive raises ``error``."""
        if self.error is None:
            self.error = error
        for streaming in self._streaming.values():
            if streaming is not None:
                self._fail_streaming(streaming, self.error)
        self._streaming.clear()
        for queue in self._posted.values():
            for posted in queue:
                _fail_future(posted.future, copy_error(self.error))
        self._posted.clear()
        self._unexpected.clear()
        self._unexpected_bytes = 0

    @staticmethod
    def _fail_streaming(posted: PostedRecv, error: SparseCollError) -> None:
        """A claimed receive fails mid-payload: its buffer goes back to its owner."""
        if posted.landing is not None:
            posted.landing.withdraw()
        _fail_future(posted.future, copy_error(error))

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
