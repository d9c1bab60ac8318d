"""One authenticated TCP socket to one peer: a framing reader and a serialized writer.

The reader is a callback on the event loop (no task per frame): small frames arrive through
a scratch buffer, large payloads are read straight into the buffer their receive was posted
with. The writer gathers header and payload into one ``sendmsg`` from the caller's buffers.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sparsecoll.errors import FrameError, PeerLostError, SparseCollError
from sparsecoll.transport.base import Buffer
from sparsecoll.transport.mailbox import Landing, copy_error, lost_peer_error
from sparsecoll.wire import (
    HEADER_SIZE,
    MAX_ABORT_MESSAGE,
    FrameHeader,
    Kind,
    decode_abort,
    decode_header,
)

if TYPE_CHECKING:
    from sparsecoll.transport.tcp import TcpTransport

SCRATCH_SIZE = 256 * 1024
DIRECT_READ_MIN = 64 * 1024
"""Payload bytes still expected above which the socket is read straight into the sink."""


def _as_bytes(buffer: Buffer) -> memoryview:
    view = memoryview(buffer)
    if not view.c_contiguous:
        raise FrameError("only contiguous buffers can be sent")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _advance(views: list[memoryview], sent: int) -> list[memoryview]:
    """Drop the first ``sent`` bytes from a list of buffers."""
    while sent and views:
        head = views[0]
        if sent >= len(head):
            sent -= len(head)
            views.pop(0)
        else:
            views[0] = head[sent:]
            sent = 0
    while views and len(views[0]) == 0:
        views.pop(0)
    return views


class TcpConnection:
    """One authenticated socket to one peer: a framing reader and a serialized writer."""

    def __init__(self, transport: TcpTransport, sock: socket.socket, peer: int) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self.sock = sock
        self.peer = peer
        self._fd = sock.fileno()
        self._scratch = bytearray(SCRATCH_SIZE)
        self._view = memoryview(self._scratch)
        self._start = 0
        self._end = 0
        self._header: FrameHeader | None = None
        self._sink: Landing | None = None
        self._filled = 0
        self._send_lock = asyncio.Lock()
        self._writable: asyncio.Future | None = None
        self.tx_broken = False
        self.bye_received = False
        self.closed = False
        self.eof = self._loop.create_future()
        self._loop.add_reader(self._fd, self._on_readable)

    # ----------------------------------------------------------------- reading
    def _on_readable(self) -> None:
        try:
            header = self._header
            if (header is not None and self._sink is not None
                    and header.length - self._filled >= DIRECT_READ_MIN):
                received = self.sock.recv_into(self._sink.view[self._filled:])
                if received == 0:
                    self._on_eof()
                    return
                self._filled += received
                self._sink.filled = self._filled
                if self._filled == header.length:
                    self._complete()
                return
            received = self.sock.recv_into(self._view[self._end:])
            if received == 0:
                self._on_eof()
                return
            self._end += received
            self._parse()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._lose(f"{type(error).__name__}: {error}")
        except SparseCollError as error:
            error.rank, error.peer = self._transport.rank, self.peer
            self._stop_reading()
            self._transport.on_failure(type(error)(error.message, rank=error.rank, peer=error.peer))

    def _parse(self) -> None:
        while True:
            available = self._end - self._start
            header = self._header
            if header is None:
                if available < HEADER_SIZE:
                    break
                frame = decode_header(self._view[self._start:self._start + HEADER_SIZE],
                                      self._transport.max_payload)
                self._start += HEADER_SIZE
                self._begin(frame)
                continue
            if available == 0:
                break
            take = min(available, header.length - self._filled)
            if self._sink is not None:
                self._sink.view[self._filled:self._filled + take] = self._view[self._start:self._start + take]
                self._sink.filled = self._filled + take
            self._start += take
            self._filled += take
            if self._filled < header.length:
                break
            self._complete()
        leftover = self._end - self._start
        if leftover:
            self._scratch[:leftover] = self._view[self._start:self._end]
        self._start, self._end = 0, leftover

    def _begin(self, header: FrameHeader) -> None:
        self._header = header
        self._filled = 0
        if header.kind == Kind.DATA:
            self._sink = self._transport.mailbox.on_header(self.peer, header)
        elif header.kind == Kind.ABORT and header.length <= MAX_ABORT_MESSAGE + 16:
            self._sink = Landing(memoryview(bytearray(header.length)), private=True)
        elif header.kind == Kind.BYE and header.length == 0:
            self._sink = None
        else:
            raise FrameError(f"unexpected {Kind(header.kind).name} frame of {header.length} bytes")
        if header.length == 0:
            self._complete()

    def _complete(self) -> None:
        header, sink = self._header, self._sink
        self._header, self._sink, self._filled = None, None, 0
        if header.kind == Kind.DATA:
            if sink is not None:
                self._transport.mailbox.on_payload(self.peer, header, sink)
        elif header.kind == Kind.ABORT:
            self._transport.on_abort(self.peer, decode_abort(bytes(sink.view), self._transport.rank), header)
        elif header.kind == Kind.BYE:
            self.bye_received = True
            self._transport.mailbox.peer_closed(self.peer, PeerLostError(
                f"peer {self.peer} closed the group", rank=self._transport.rank, peer=self.peer))

    def _on_eof(self) -> None:
        self._stop_reading()
        if not self.bye_received and not self._transport.closing:
            self._transport.peer_lost(self.peer, "connection closed by the peer")

    def _lose(self, detail: str) -> None:
        self._stop_reading()
        if not self._transport.closing:
            self._transport.peer_lost(self.peer, detail)

    def _stop_reading(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.remove_reader(self._fd)
        if not self.eof.done():
            self.eof.set_result(None)

    # ----------------------------------------------------------------- writing
    async def send(self, buffers: Sequence[Buffer]) -> None:
        views = [_as_bytes(buffer) for buffer in buffers]
        async with self._send_lock:
            if self.tx_broken:
                if self._transport.mailbox.error is not None:
                    raise copy_error(self._transport.mailbox.error)
                raise lost_peer_error(self._transport.rank, self.peer, "an earlier send was interrupted")
            started = False
            try:
                while views:
                    try:
                        sent = self.sock.sendmsg(views)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    started = started or sent > 0
                    views = _advance(views, sent)
                    if views:
                        await self._wait_writable()
            except SparseCollError:
                # the group failed meanwhile (fail_writer); CollectiveTimeoutError is an
                # OSError too, so this must come before the socket's own errors
                if started:
                    self.tx_broken = True
                raise
            except OSError as error:
                self.tx_broken = True
                self._lose(f"{type(error).__name__}: {error}")
                raise lost_peer_error(self._transport.rank, self.peer, str(error)) from None
            except BaseException:
                if started:
                    self.tx_broken = True
                raise

    async def _wait_writable(self) -> None:
        future = self._loop.create_future()
        self._writable = future

        def ready() -> None:
            if not future.done():
                future.set_result(None)

        self._loop.add_writer(self._fd, ready)
        try:
            await future
        finally:
            self._loop.remove_writer(self._fd)
            self._writable = None

    def fail_writer(self, error: SparseCollError) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_exception(type(error)(error.message, rank=error.rank, peer=error.peer))

    def release(self) -> None:
        self._stop_reading()
        try:
            self.sock.close()
        except OSError:
            pass
