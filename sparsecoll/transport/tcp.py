"""Transport over plain TCP sockets driven by the asyncio event loop.

One authenticated connection per pair of ranks (the higher rank connects; see
:mod:`.tcp_connection` for one connection). Sending uses
``sendmsg`` straight from the caller's buffers (header and payload gathered, never
concatenated); receiving reads small frames through a scratch buffer and large payloads
directly into the buffer the receive was posted with, so neither side copies a large
array in user space.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

from sparsecoll.errors import (
    FrameError,
    RendezvousError,
    SparseCollError,
)
from sparsecoll.transport.base import Buffer, Throttled, Transport, port_range
from sparsecoll.transport.device import is_device, stage_to_host
from sparsecoll.transport.handshake import accept_handshake, connect_handshake
from sparsecoll.transport.tcp_connection import TcpConnection
from sparsecoll.wire import (
    FrameHeader,
    Kind,
    encode_abort,
    encode_header,
)


HANDSHAKE_TIMEOUT = 30.0
ACCEPT_BACKOFF_FIRST = 0.01
ACCEPT_BACKOFF_MAX = 1.0
"""Seconds between retries of a failing ``accept()``: from the first, doubling, to the second."""


class TcpTransport(Transport):
    """A full mesh of TCP connections, one per pair of ranks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.closing = False
        self._connections: dict[int, TcpConnection] = {}
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None
        self._accept_failures = Throttled()
        self._background: set[asyncio.Task] = set()
        self._mesh_changed: asyncio.Event | None = None

    # ----------------------------------------------------------------- set-up
    async def listen(self, host: str) -> str:
        self._mesh_changed = asyncio.Event()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        ports = port_range()
        failure: OSError | None = None
        for port in ports or (0,):
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.bind((host, port))
                listener.listen(max(16, self.size))
                break
            except OSError as error:
                listener.close()
                failure = error
        else:
            where = f"any port of {ports.start}-{ports.stop - 1} (SPARSECOLL_PORT_RANGE)" if ports else "a port"
            raise RendezvousError(f"cannot listen on {host} at {where}: {failure}", rank=self.rank) from failure
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
        """Accept peers until set-up ends. A failed ``accept()`` (too many open files, a
        connection reset while queued, no buffers) is retried after a pause that doubles up
        to ``ACCEPT_BACKOFF_MAX``, as servers do: the peers waiting in the backlog still get in."""
        loop = asyncio.get_running_loop()
        pause = ACCEPT_BACKOFF_FIRST
        while self._listener is not None:
            try:
                sock, _ = await loop.sock_accept(self._listener)
            except asyncio.CancelledError:
                return
            except OSError as error:
                if self._listener is None or self._listener.fileno() < 0:
                    return
                self._accept_failures.warn("rank %d: accept failed (%s); retrying", self.rank, error)
                await asyncio.sleep(pause)
                pause = min(2 * pause, ACCEPT_BACKOFF_MAX)
                continue
            pause = ACCEPT_BACKOFF_FIRST
            task = asyncio.ensure_future(self._accept_one(sock))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _accept_one(self, sock: socket.socket) -> None:
        """Authenticate one incoming connection; anything that fails before the peer has
        proved the secret is dropped as a stray (see :meth:`Transport.drop_stray`)."""
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
            self.drop_stray(error if isinstance(error, SparseCollError) else FrameError(
                f"stray connection dropped: {error!r}", rank=self.rank))
            self._mesh_changed.set()
            return
        self._add_connection(peer, sock)

    def _add_connection(self, peer: int, sock: socket.socket) -> None:
        self._connections[peer] = TcpConnection(self, sock, peer)
        self._mesh_changed.set()

    def _stop_listening(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            self._accept_task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    # ----------------------------------------------------------------- data
    async def _send_frame(self, connection: TcpConnection, header: FrameHeader,
                          payload: Sequence[Buffer]) -> None:
        # sockets move host bytes: device buffers are staged through (pinned) host memory
        staged = [stage_to_host(buffer) if is_device(buffer) else buffer for buffer in payload]
        await connection.send([encode_header(header), *staged])

    def send_abort(self, error: SparseCollError) -> None:
        payload = encode_abort(self.rank, error)
        header = self.abort_header(len(payload))
        for peer, connection in self._connections.items():
            if connection.closed or connection.tx_broken:
                continue
            task = asyncio.ensure_future(self._send_quietly(connection, header, payload))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _send_quietly(self, connection: TcpConnection, header: FrameHeader, payload: bytes) -> None:
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
