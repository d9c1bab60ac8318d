"""Transport over plain TCP sockets driven by the asyncio event loop.

One authenticated connection per pair of ranks (the higher rank connects). Sending uses
``sendmsg`` straight from the caller's buffers (header and payload gathered, never
concatenated); receiving reads small frames through a scratch buffer and large payloads
directly into the buffer the receive was posted with, so neither side copies a large
array in user space.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence

from sparsecoll.errors import (
    FrameError,
    GroupAbortedError,
    PeerLostError,
    RendezvousError,
    SparseCollError,
)
from sparsecoll.transport.base import Buffer, Transport
from sparsecoll.transport.handshake import accept_handshake, connect_handshake
from sparsecoll.transport.mailbox import copy_error, lost_peer_error
from sparsecoll.wire import (
    HEADER_SIZE,
    MAX_ABORT_MESSAGE,
    FrameHeader,
    Kind,
    decode_abort,
    decode_header,
    encode_abort,
    encode_header,
)

log = logging.getLogger(__name__)

SCRATCH_SIZE = 256 * 1024
DIRECT_READ_MIN = 64 * 1024
"""Payload bytes still expected above which the socket is read straight into the sink."""
HANDSHAKE_TIMEOUT = 30.0


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


class _Connection:
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
        self._sink: memoryview | None = None
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
                received = self.sock.recv_into(self._sink[self._filled:])
                if received == 0:
                    self._on_eof()
                    return
                self._filled += received
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
                self._sink[self._filled:self._filled + take] = self._view[self._start:self._start + take]
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
            self._sink = memoryview(bytearray(header.length))
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
            self._transport.on_failure(decode_abort(bytes(sink), self._transport.rank))
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


class TcpTransport(Transport):
    """A full mesh of TCP connections, one per pair of ranks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.closing = False
        self._connections: dict[int, _Connection] = {}
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._mesh_changed: asyncio.Event | None = None
        self._fatal: SparseCollError | None = None

    # ----------------------------------------------------------------- set-up
    async def listen(self, host: str) -> str:
        self._mesh_changed = asyncio.Event()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.bind((host, 0))
            listener.listen(max(16, self.size))
        except OSError as error:
            listener.close()
            raise RendezvousError(f"cannot listen on {host}: {error}", rank=self.rank) from error
        listener.setblocking(False)
        self._listener = listener
        self._accept_task = asyncio.ensure_future(self._accept_loop())
        port = listener.getsockname()[1]
        return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"

    async def connect(self, addresses: Sequence[str], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        outgoing = [asyncio.ensure_future(self._connect_to(peer, addresses[peer], deadline))
                    for peer in range(self.rank)]
        try:
            await self._wait_for_mesh(outgoing, deadline, timeout)
        finally:
            for task in outgoing:
                task.cancel()
            self._stop_listening()

    async def _connect_to(self, peer: int, address: str, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        while True:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (host, int(port)))
                break
            except OSError as error:
                sock.close()
                if loop.time() > deadline:
                    raise RendezvousError(f"cannot connect to {address}: {error}",
                                          rank=self.rank, peer=peer) from error
                await asyncio.sleep(0.05)
        try:
            _tune(sock)
            await asyncio.wait_for(
                connect_handshake(sock, self.secret, self.group_id, self.rank, self.size, peer),
                max(0.1, min(HANDSHAKE_TIMEOUT, deadline - loop.time())))
        except SparseCollError:
            sock.close()
            raise
        except (OSError, asyncio.TimeoutError) as error:
            sock.close()
            raise RendezvousError(f"handshake with {address} failed: {error!r}",
                                  rank=self.rank, peer=peer) from error
        self._add_connection(peer, sock)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._listener)
            except (OSError, asyncio.CancelledError):
                return
            task = asyncio.ensure_future(self._accept_one(sock))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _accept_one(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            _tune(sock)
            peer = await asyncio.wait_for(
                accept_handshake(sock, self.secret, self.group_id, self.rank, self.size),
                HANDSHAKE_TIMEOUT)
            if peer in self._connections:
                raise RendezvousError(f"second connection claiming rank {peer}", rank=self.rank)
        except asyncio.CancelledError:
            sock.close()
            raise
        except (SparseCollError, OSError, asyncio.TimeoutError) as error:
            sock.close()
            if isinstance(error, SparseCollError) and error.peer is not None:
                self._fatal = self._fatal or error
            else:
                stray = error if isinstance(error, SparseCollError) else FrameError(
                    f"stray connection dropped: {error!r}", rank=self.rank)
                self.rejected.append(stray)
                log.warning("rank %d dropped a connection: %s", self.rank, stray)
            self._mesh_changed.set()
            return
        self._add_connection(peer, sock)

    def _add_connection(self, peer: int, sock: socket.socket) -> None:
        self._connections[peer] = _Connection(self, sock, peer)
        self._mesh_changed.set()

    def _stop_listening(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            self._accept_task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    # ----------------------------------------------------------------- data
    async def send(self, peer: int, header: FrameHeader, payload: Sequence[Buffer] = ()) -> None:
        connection = self._connections.get(peer)
        if connection is None or connection.closed and not connection.bye_received:
            raise lost_peer_error(self.rank, peer, "no open connection")
        try:
            await connection.send([encode_header(header), *payload])
        except asyncio.CancelledError:
            if connection.tx_broken:
                self.on_failure(GroupAbortedError(
                    f"a send to rank {peer} was cancelled mid-frame; the connection cannot be "
                    "resynchronized", rank=self.rank, peer=peer))
            raise

    def peer_lost(self, peer: int, detail: str) -> None:
        error = lost_peer_error(self.rank, peer, detail)
        self.mailbox.peer_closed(peer, error)
        self.on_failure(error)
        if self._mesh_changed is not None:
            self._mesh_changed.set()

    def send_abort(self, error: SparseCollError) -> None:
        payload = encode_abort(self.rank, error)
        header = FrameHeader(kind=Kind.ABORT, context=0, seq=0, tag=0, length=len(payload))
        for peer, connection in self._connections.items():
            if connection.closed or connection.tx_broken:
                continue
            task = asyncio.ensure_future(self._send_quietly(connection, header, payload))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _send_quietly(self, connection: _Connection, header: FrameHeader, payload: bytes) -> None:
        try:
            await asyncio.wait_for(connection.send([encode_header(header), payload]), 1.0)
        except (SparseCollError, OSError, asyncio.TimeoutError):
            pass

    def fail_pending_sends(self, error: SparseCollError) -> None:
        for connection in self._connections.values():
            connection.fail_writer(error)

    async def close(self, linger: float = 1.0) -> None:
        if self.closing:
            return
        self._stop_listening()
        if self._background:
            await asyncio.wait(list(self._background), timeout=linger)
        self.closing = True
        bye = encode_header(FrameHeader(kind=Kind.BYE, context=0, seq=0, tag=0, length=0))
        for connection in self._connections.values():
            if connection.closed or connection.tx_broken:
                continue
            try:
                await asyncio.wait_for(connection.send([bye]), linger)
                connection.sock.shutdown(socket.SHUT_WR)
            except (SparseCollError, OSError, asyncio.TimeoutError):
                pass
        waiting = [c.eof for c in self._connections.values() if not c.eof.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=linger)
        for connection in self._connections.values():
            connection.release()
        for task in list(self._background):
            task.cancel()


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
