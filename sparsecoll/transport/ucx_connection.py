"""One UCX endpoint carrying sparsecoll frames: how a frame becomes UCX messages and back.

Every message on an endpoint is a tag message on the endpoint's private tag, delivered in the
order it was sent. A frame is

* the *header message*: the 64-byte frame header, followed for small host payloads by the
  payload itself (flag ``INLINE_PAYLOAD``: one message, one completion), or for a payload
  sent from several buffers by a table of their sizes (flag ``SEGMENTED_PAYLOAD``);
* then, unless inlined, one message per payload buffer, which the receiver posts straight
  into the buffer the mailbox chose (the caller's array: zero-copy, host or device memory);
  with flag ``PAYLOAD_ENDPOINT`` these follow on the connection's payload endpoint instead.

The flags are bits of the header's ``flags`` field that only this transport sets or reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sparsecoll.errors import FrameError, InvalidArgumentError, PeerLostError, SparseCollError
from sparsecoll.transport.base import Buffer
from sparsecoll.transport.mailbox import Landing, copy_error, copy_out, lost_peer_error
from sparsecoll.transport.ucx_runtime import (
    UCX_ERRORS,
    PayloadEndpoint,
    as_message,
    attempt,
    close_endpoint,
    copy_into,
    cuda_support,
    describe,
    is_device,
    nbytes,
    post_recv,
    post_send,
    recv,
)
from sparsecoll.wire import HEADER_SIZE, MAX_ABORT_MESSAGE, FrameHeader, Kind, decode_abort, decode_header, encode_header

INLINE_PAYLOAD = 0x8000
"""Header flag (UCX transport only): the payload follows the header in the same message."""
SEGMENTED_PAYLOAD = 0x4000
"""Header flag (UCX transport only): a table of per-buffer sizes follows the header."""
PAYLOAD_ENDPOINT = 0x2000
"""Header flag (UCX transport only): the payload messages follow on the payload endpoint."""
INLINE_MAX = 8192 - HEADER_SIZE
"""Largest host payload sent inside the header message (stays below UCX's eager limit)."""
MAX_SEGMENTS = 64
SEND_RELEASE_GRACE = 2.0
"""Seconds a cancelled or failed send waits for UCX to finish with its buffers before it
closes the endpoint to cancel them."""
_COUNT = struct.Struct("<I")


def frame_messages(header: FrameHeader, payload: Sequence[Buffer], rank: int,
                   payload_endpoint: bool = False) -> tuple[list[Any], bool]:
    """The UCX messages of one frame (header, with inline payload or size table, then data),
    and whether the data messages travel over the connection's payload endpoint.

    With ``payload_endpoint``, a host payload that is not inlined is flagged to go there
    (device buffers always take the connection's own endpoint).
    """
    buffers = [buffer for buffer in payload if nbytes(buffer)]
    on_device = any(is_device(buffer) for buffer in buffers)
    if on_device and not cuda_support():
        raise InvalidArgumentError(
            "a device buffer was given but UCX has no CUDA transport; add cuda_copy "
            "(and cuda_ipc) to UCX_TLS", rank=rank)
    if 0 < header.length <= INLINE_MAX and not on_device:
        message = bytearray(encode_header(dataclasses.replace(header, flags=header.flags | INLINE_PAYLOAD)))
        for buffer in buffers:
            message += as_message(buffer)
        return [message], False
    separate = payload_endpoint and bool(buffers) and not on_device
    if separate:
        header = dataclasses.replace(header, flags=header.flags | PAYLOAD_ENDPOINT)
    if len(buffers) > 1:
        if len(buffers) > MAX_SEGMENTS:
            raise InvalidArgumentError(f"a frame holds at most {MAX_SEGMENTS} buffers", rank=rank)
        sizes = [nbytes(buffer) for buffer in buffers]
        table = _COUNT.pack(len(sizes)) + struct.pack(f"<{len(sizes)}Q", *sizes)
        flagged = dataclasses.replace(header, flags=header.flags | SEGMENTED_PAYLOAD)
        return [encode_header(flagged) + table, *buffers], separate
    return [encode_header(header), *buffers], separate



class UcxConnection:
    """One authenticated UCX endpoint to one peer: a frame reader task and ordered sends.

    With a :class:`PayloadEndpoint` (a peer on the same host), host payloads that are not
    inlined travel over it (flag ``PAYLOAD_ENDPOINT``), so UCX can move them through shared
    memory; everything else stays on ``endpoint``.
    """

    def __init__(self, transport: Any, endpoint: Any, peer: int,
                 payload_endpoint: PayloadEndpoint | None = None) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self.endpoint = endpoint
        self.payload_endpoint = payload_endpoint
        self._payload_open = payload_endpoint is not None
        self.peer = peer
        self._slots = (bytearray(HEADER_SIZE + INLINE_MAX), bytearray(HEADER_SIZE + INLINE_MAX))
        self._slot = self._slots[0]
        self._slot_view = memoryview(self._slot)
        self._next_header: asyncio.Future | None = None
        self._waiters: set[asyncio.Future] = set()
        self.tx_broken = False
        self._abandoned = False
        """Set when a cut-off send closed the endpoint: the sender reports that failure."""
        self.bye_received = False
        self.closed = False
        self.eof = self._loop.create_future()
        self._reader = asyncio.ensure_future(self._read_frames())

    # ----------------------------------------------------------------- reading
    async def _read_frames(self) -> None:
        try:
            while await self._read_frame():
                pass
        except PeerLostError as error:
            self._lose(error.message)
        except SparseCollError as error:
            self._stop_reading()
            self._transport.on_failure(type(error)(error.message, rank=self._transport.rank, peer=self.peer))
        except UCX_ERRORS as error:
            self._lose(describe(error))
        finally:
            self._stop_reading()

    async def _read_frame(self) -> bool:
        """Receive one frame and hand it on; False once the peer said goodbye."""
        if self._next_header is None:
            await recv(self.endpoint, self._slot)
        else:
            next_header, self._next_header = self._next_header, None
            self._slot = self._spare_slot()
            self._slot_view = memoryview(self._slot)
            await next_header
        header = decode_header(self._slot_view[:HEADER_SIZE], self._transport.max_payload)
        if header.kind == Kind.DATA:
            sink = self._transport.mailbox.on_header(self.peer, header)
        elif header.kind == Kind.ABORT and header.length <= MAX_ABORT_MESSAGE + 16:
            sink = Landing(memoryview(bytearray(header.length)), private=True)
        elif header.kind == Kind.BYE and header.length == 0:
            sink = None
        else:
            raise FrameError(f"unexpected {Kind(header.kind).name} frame of {header.length} bytes")
        await self._receive_payload(header, sink)
        if header.kind == Kind.DATA:
            if sink is not None:
                self._transport.mailbox.on_payload(self.peer, header, sink)
        elif header.kind == Kind.ABORT:
            self._transport.on_abort(self.peer, decode_abort(bytes(sink.view), self._transport.rank), header)
        else:
            self.bye_received = True
            self._transport.mailbox.peer_closed(self.peer, PeerLostError(
                f"peer {self.peer} closed the group", rank=self._transport.rank, peer=self.peer))
            return False
        return True

    async def _receive_payload(self, header: FrameHeader, sink: Landing | None) -> None:
        """The payload of ``header`` into ``sink`` (None: received and dropped)."""
        if header.length == 0:
            return
        if header.flags & INLINE_PAYLOAD:
            if header.length > INLINE_MAX:
                raise FrameError(f"inline payload of {header.length} bytes exceeds {INLINE_MAX}")
            if sink is not None:
                copy_into(sink.view, self._slot_view[HEADER_SIZE:HEADER_SIZE + header.length])
                sink.filled = header.length
            return
        sizes = self._segment_sizes(header) if header.flags & SEGMENTED_PAYLOAD else [header.length]
        receive = self._payload_receiver(header)
        for size in sizes:
            if sink is None:
                await self._drop_message(receive)
            elif size:
                await self._receive_segment(receive, sink, size)

    async def _receive_segment(self, receive: Callable[[Any], Awaitable[None]], sink: Landing,
                               size: int) -> None:
        """One payload message into ``sink`` at ``sink.filled``.

        UCX writes into the caller's buffer until the message completes, and cannot be
        redirected meanwhile; so while it does, ``sink.in_flight`` tells a withdrawing
        receiver to wait, and a segment that landed after the withdrawal is copied into the
        private buffer before that wait ends.
        """
        offset = sink.filled
        target = sink.view
        if sink.private:
            await receive(target[offset:offset + size])
            sink.filled = offset + size
            return
        in_flight = self._loop.create_future()
        sink.in_flight = in_flight
        try:
            await receive(target[offset:offset + size])
            if sink.view is not target:  # withdrawn meanwhile: the caller is still waiting
                sink.view[offset:offset + size] = copy_out(target[offset:offset + size])
            sink.filled = offset + size
        finally:
            sink.in_flight = None
            in_flight.set_result(None)

    def _payload_receiver(self, header: FrameHeader) -> Callable[[Any], Awaitable[None]]:
        """How this frame's payload messages are received.

        Over the payload endpoint, the next header's receive is posted first (into the other
        slot): it completes early when the peer sends on, and it fails as soon as the
        connection's endpoint does, so a peer that dies mid-payload is noticed at once.
        """
        if not header.flags & PAYLOAD_ENDPOINT:
            return lambda buffer: recv(self.endpoint, buffer)
        if self.payload_endpoint is None:
            raise FrameError("payload sent over a payload endpoint this connection does not have")
        self._next_header = post_recv(self.endpoint, self._spare_slot())
        return self._receive_watching

    def _spare_slot(self) -> bytearray:
        """The header slot the current frame is not using (a pre-posted next header goes there)."""
        return self._slots[self._slot is self._slots[0]]

    async def _receive_watching(self, buffer: Any) -> None:
        """One payload message from the payload endpoint; raises the connection's endpoint error."""
        receiving = asyncio.ensure_future(self.payload_endpoint.recv(buffer))
        watch = self._next_header
        await asyncio.wait([receiving, watch], return_when=asyncio.FIRST_COMPLETED)
        if not receiving.done() and not watch.cancelled() and watch.exception() is not None:
            receiving.cancel()
            raise watch.exception()
        await receiving

    def _segment_sizes(self, header: FrameHeader) -> list[int]:
        (count,) = _COUNT.unpack_from(self._slot, HEADER_SIZE)
        if not 0 < count <= MAX_SEGMENTS:
            raise FrameError(f"segmented frame of {count} buffers (at most {MAX_SEGMENTS})")
        sizes = list(struct.unpack_from(f"<{count}Q", self._slot, HEADER_SIZE + _COUNT.size))
        if sum(sizes) != header.length:
            raise FrameError(f"segment sizes add up to {sum(sizes)}, header says {header.length}")
        return sizes

    @staticmethod
    async def _drop_message(receive: Callable[[Any], Awaitable[None]]) -> None:
        """Consume one message nobody wants: a 1-byte receive truncates it without allocating."""
        failure = await attempt(receive(bytearray(1)))
        if failure and "truncated" not in failure.lower():
            raise PeerLostError(failure)

    def _lose(self, detail: str) -> None:
        self._stop_reading()
        self.tx_broken = True
        if not self._transport.closing and not self._abandoned:
            self._transport.peer_lost(self.peer, detail)

    def _stop_reading(self) -> None:
        self.closed = True
        if not self.eof.done():
            self.eof.set_result(None)

    # ----------------------------------------------------------------- writing
    async def send_frame(self, header: FrameHeader, payload: Sequence[Buffer]) -> None:
        """Send one frame: its header message, then its payload messages, in order."""
        messages, separate = frame_messages(header, payload, self._transport.rank, self._payload_open)
        if separate:
            await self.send(messages[:1], messages[1:])
        else:
            await self.send(messages)

    async def send(self, messages: Sequence[Any], payload_messages: Sequence[Any] = ()) -> None:
        """Send ``messages`` in order on the endpoint, then ``payload_messages`` on the payload endpoint.

        All messages are submitted before this coroutine first yields, so frames of
        concurrent senders never interleave; when UCX completes them on submission (small
        eager messages) it returns without yielding at all. A cancelled or failed send
        returns only once UCX no longer reads its buffers (see :meth:`_stop_reading_buffers`).
        """
        if self.tx_broken:
            if self._transport.mailbox.error is not None:
                raise copy_error(self._transport.mailbox.error)
            raise lost_peer_error(self._transport.rank, self.peer, "the endpoint failed")
        sends = [post_send(self.endpoint, as_message(message)) for message in messages]
        sends += [self.payload_endpoint.post_send(as_message(message)) for message in payload_messages]
        if all(sent.done() for sent in sends) and not any(sent.cancelled() or sent.exception() for sent in sends):
            return  # eager messages UCX completed on submission: no loop round trip
        waiter = self._loop.create_future()
        self._waiters.add(waiter)
        gathered = asyncio.gather(*sends)
        gathered.add_done_callback(lambda done: self._sent(done, waiter))
        try:
            await waiter
        except BaseException:
            await self._stop_reading_buffers(gathered)
            raise
        finally:
            self._waiters.discard(waiter)
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # failed by fail_writer while our caller was being cancelled

    async def _stop_reading_buffers(self, sends: asyncio.Future) -> None:
        """A send that is cancelled or failed returns only once UCX no longer reads its
        buffers: its messages complete within ``SEND_RELEASE_GRACE`` seconds (the frame
        went out whole, the connection stays in step), or the endpoint is closed, which
        cancels them (the connection is then broken for data). When the peer is lost (or
        said goodbye) it returns at once: no rank will ever deliver what UCX still reads."""
        if sends.done() or self.eof.done():
            return
        try:
            await asyncio.wait([sends, self.eof], timeout=SEND_RELEASE_GRACE,
                               return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass  # cancelled again: stop waiting and cut the transfer off below
        if sends.done() or self.eof.done():
            return  # a peer that is gone, or said goodbye, delivers nothing read late
        self.tx_broken = True
        self._abandoned = True
        await close_endpoint(self.endpoint)
        await self.close_payload_endpoint()

    def _sent(self, done: asyncio.Future, waiter: asyncio.Future) -> None:
        error = None if done.cancelled() else done.exception()
        if error is not None and not isinstance(error, UCX_ERRORS):
            waiter.done() or waiter.set_exception(error)
            return
        if error is not None:
            error = describe(error)
            self._lose(error)
        if waiter.done():
            return
        if error is None and not done.cancelled():
            waiter.set_result(None)
        else:
            waiter.set_exception(lost_peer_error(self._transport.rank, self.peer, f"send failed: {error}"))

    def fail_writer(self, error: SparseCollError) -> None:
        for waiter in list(self._waiters):
            if not waiter.done():
                waiter.set_exception(copy_error(error))

    async def close_payload_endpoint(self) -> None:
        """Flush and close the payload endpoint; later payloads take the connection's endpoint.

        Its flush needs the peer to progress, so the transport does this early in its close,
        while the peer is closing too.
        """
        if self._payload_open:
            self._payload_open = False
            await close_endpoint(self.payload_endpoint.endpoint)

    async def release(self) -> None:
        """Close the endpoints (cancelling their transfers), then let the reader finish."""
        self._stop_reading()
        self.tx_broken = True
        if self._next_header is not None:
            self._next_header.cancel()
        await close_endpoint(self.endpoint)  # a closed ucxx Endpoint drops its context
        await self.close_payload_endpoint()
        if not self._reader.done():
            await asyncio.wait([self._reader], timeout=1.0)
            self._reader.cancel()
        self.fail_writer(lost_peer_error(self._transport.rank, self.peer, "the transport was closed"))
