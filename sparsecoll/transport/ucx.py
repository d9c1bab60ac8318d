"""Transport over UCX through ucxx's asyncio API: host and GPU buffers, any UCX fabric.

The same mesh, frames, HMAC handshake, deadlines, ABORT and BYE as the TCP transport; only
the way bytes move differs. Each pair of ranks shares one UCX endpoint (the higher rank
connects to the lower rank's listener) and every message on it is a UCX tag message on the
endpoint's private tag, which UCX delivers in the order it was sent:

* the *header message*: the 64-byte frame header, followed for small host payloads by the
  payload itself (flag ``INLINE_PAYLOAD``: one message, one completion) or, for a payload
  sent from several buffers, by a table of their sizes (flag ``SEGMENTED_PAYLOAD``);
* then, unless inlined, the payload as one message per buffer, which the receiver posts
  straight into the buffer the mailbox chose (the caller's array: zero-copy), so large
  arrays use UCX's rendezvous protocol (RDMA on InfiniBand, CUDA IPC between GPUs).

Device buffers (anything with ``__cuda_array_interface__``: cupy, torch CUDA tensors, Numba
device arrays) are handed to UCX as they are, on both sides.

Choosing the fabric follows UCX's own conventions, so the same code runs anywhere:

* ``UCX_TLS`` lists the transports UCX may use. Unset (``all``) lets UCX pick the best per
  pair of ranks: shared memory (``sm``: posix, sysv, cma, xpmem) inside a host, InfiniBand /
  RoCE (``rc``, ``ud``, ``dc``, their ``_x`` / ``_mlx5`` accelerated forms) between hosts,
  TCP otherwise. Examples: ``UCX_TLS=rc,sm,self`` (reliable connected InfiniBand plus shared
  memory), ``UCX_TLS=dc,sm,self`` (dynamically connected, for large jobs),
  ``UCX_TLS=ud,sm,self``, ``UCX_TLS=tcp`` (plain sockets, e.g. for CI), and for GPU buffers
  add ``cuda_copy,cuda_ipc`` (``UCX_TLS=rc,cuda_copy,cuda_ipc,sm``; with ``tcp`` alone UCX
  cannot carry device memory).
* ``UCX_NET_DEVICES`` picks the NICs: ``mlx5_0:1`` (HCA and port), ``mlx5_0:1,mlx5_1:1``
  (two rails), ``eth0`` or ``lo`` (TCP interfaces).
* ``ucx_info -d`` lists what a machine offers; ``UCX_LOG_LEVEL=info`` shows what was chosen.

Connections are set up over TCP/IP sockets (UCX's sockaddr connection manager: ``rdmacm``
on IPoIB, else ``tcp``), so the addresses published through the rendezvous store are
``host:port`` as for the TCP transport. ucxx keeps one UCX context per process, bound to
the event loop that created it; every UcxTransport of the process shares it, and the last
one to close shuts it down so the process exits cleanly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import struct
from collections.abc import Sequence
from typing import Any

from sparsecoll.errors import (
    CollectiveTimeoutError,
    FrameError,
    GroupAbortedError,
    InvalidArgumentError,
    PeerLostError,
    RendezvousError,
    SparseCollError,
)
from sparsecoll.transport import ucx_runtime
from sparsecoll.transport.base import Buffer, Transport
from sparsecoll.transport.handshake import accept_handshake, connect_handshake
from sparsecoll.transport.mailbox import copy_error, lost_peer_error
from sparsecoll.transport.ucx_runtime import UCX_ERRORS, UcxChannel, as_message, copy_into, is_device
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

INLINE_PAYLOAD = 0x8000
"""Header flag (UCX transport only): the payload follows the header in the same message."""
SEGMENTED_PAYLOAD = 0x4000
"""Header flag (UCX transport only): a table of per-buffer sizes follows the header."""
INLINE_MAX = 8192 - HEADER_SIZE
"""Largest host payload sent inside the header message (stays below UCX's eager limit)."""
MAX_SEGMENTS = 64
_COUNT = struct.Struct("<I")
HANDSHAKE_TIMEOUT = 30.0


class _Connection:
    """One authenticated UCX endpoint to one peer: a frame reader task and ordered sends."""

    def __init__(self, transport: UcxTransport, endpoint: Any, peer: int) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self.endpoint = endpoint
        self.peer = peer
        self._slot = bytearray(HEADER_SIZE + INLINE_MAX)
        self._slot_view = memoryview(self._slot)
        self._waiters: set[asyncio.Future] = set()
        self.tx_broken = False
        self.bye_received = False
        self.closed = False
        self.eof = self._loop.create_future()
        self._reader = asyncio.ensure_future(self._read_frames())

    # ----------------------------------------------------------------- reading
    async def _read_frames(self) -> None:
        try:
            while await self._read_frame():
                pass
        except SparseCollError as error:
            self._stop_reading()
            self._transport.on_failure(type(error)(error.message, rank=self._transport.rank, peer=self.peer))
        except UCX_ERRORS as error:
            self._lose(f"{type(error).__name__}: {error}")
        finally:
            self._stop_reading()

    async def _read_frame(self) -> bool:
        """Receive one frame and hand it on; False once the peer said goodbye."""
        await self.endpoint.recv(self._slot)
        header = decode_header(self._slot_view[:HEADER_SIZE], self._transport.max_payload)
        if header.kind == Kind.DATA:
            sink = self._transport.mailbox.on_header(self.peer, header)
        elif header.kind == Kind.ABORT and header.length <= MAX_ABORT_MESSAGE + 16:
            sink = memoryview(bytearray(header.length))
        elif header.kind == Kind.BYE and header.length == 0:
            sink = None
        else:
            raise FrameError(f"unexpected {Kind(header.kind).name} frame of {header.length} bytes")
        await self._receive_payload(header, sink)
        if header.kind == Kind.DATA:
            if sink is not None:
                self._transport.mailbox.on_payload(self.peer, header, sink)
        elif header.kind == Kind.ABORT:
            self._transport.on_failure(decode_abort(bytes(sink), self._transport.rank))
        else:
            self.bye_received = True
            self._transport.mailbox.peer_closed(self.peer, PeerLostError(
                f"peer {self.peer} closed the group", rank=self._transport.rank, peer=self.peer))
            return False
        return True

    async def _receive_payload(self, header: FrameHeader, sink: Any) -> None:
        """The payload of ``header`` into ``sink`` (None: received and dropped)."""
        if header.length == 0:
            return
        if header.flags & INLINE_PAYLOAD:
            if header.length > INLINE_MAX:
                raise FrameError(f"inline payload of {header.length} bytes exceeds {INLINE_MAX}")
            if sink is not None:
                copy_into(sink, self._slot_view[HEADER_SIZE:HEADER_SIZE + header.length])
            return
        sizes = self._segment_sizes(header) if header.flags & SEGMENTED_PAYLOAD else [header.length]
        offset = 0
        for size in sizes:
            if sink is None:
                await self._drop_message()
            elif size:
                await self.endpoint.recv(sink[offset:offset + size])
            offset += size

    def _segment_sizes(self, header: FrameHeader) -> list[int]:
        (count,) = _COUNT.unpack_from(self._slot, HEADER_SIZE)
        if not 0 < count <= MAX_SEGMENTS:
            raise FrameError(f"segmented frame of {count} buffers (at most {MAX_SEGMENTS})")
        sizes = list(struct.unpack_from(f"<{count}Q", self._slot, HEADER_SIZE + _COUNT.size))
        if sum(sizes) != header.length:
            raise FrameError(f"segment sizes add up to {sum(sizes)}, header says {header.length}")
        return sizes

    async def _drop_message(self) -> None:
        """Consume one message nobody wants: a 1-byte receive truncates it without allocating."""
        try:
            await self.endpoint.recv(bytearray(1))
        except UCX_ERRORS as error:
            if "truncated" not in str(error).lower():
                raise

    def _lose(self, detail: str) -> None:
        self._stop_reading()
        self.tx_broken = True
        if not self._transport.closing:
            self._transport.peer_lost(self.peer, detail)

    def _stop_reading(self) -> None:
        self.closed = True
        if not self.eof.done():
            self.eof.set_result(None)

    # ----------------------------------------------------------------- writing
    async def send(self, messages: Sequence[Any]) -> None:
        """Send ``messages`` (a frame: header message, then payload messages) in order.

        All messages are submitted before this coroutine first yields, so frames of
        concurrent senders never interleave. A cancelled send still completes in the
        background (UCX owns the buffers until then), so the connection stays in step.
        """
        if self.tx_broken:
            if self._transport.mailbox.error is not None:
                raise copy_error(self._transport.mailbox.error)
            raise lost_peer_error(self._transport.rank, self.peer, "the endpoint failed")
        tasks = [asyncio.ensure_future(self.endpoint.send(as_message(message))) for message in messages]
        waiter = self._loop.create_future()
        self._waiters.add(waiter)
        asyncio.gather(*tasks).add_done_callback(lambda done: self._sent(done, waiter))
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # failed by fail_writer while our caller was being cancelled

    def _sent(self, done: asyncio.Future, waiter: asyncio.Future) -> None:
        error = None if done.cancelled() else done.exception()
        if error is not None and not isinstance(error, UCX_ERRORS):
            waiter.done() or waiter.set_exception(error)
            return
        if error is not None:
            self._lose(f"{type(error).__name__}: {error}")
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

    async def release(self) -> None:
        """Close the endpoint (cancelling its transfers), then let the reader finish."""
        self._stop_reading()
        self.tx_broken = True
        endpoint, self.endpoint = self.endpoint, None
        await ucx_runtime.close_endpoint(endpoint)
        if not self._reader.done():
            await asyncio.wait([self._reader], timeout=1.0)
            self._reader.cancel()
        self.fail_writer(lost_peer_error(self._transport.rank, self.peer, "the transport was closed"))


class UcxTransport(Transport):
    """A full mesh of UCX endpoints, one per pair of ranks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not ucx_runtime.available():
            raise InvalidArgumentError(
                "the 'ucx' backend needs ucxx: pip install 'sparsecoll[ucx]' "
                f"({ucx_runtime.import_error()})", rank=self.rank)
        self.closing = False
        self._connections: dict[int, _Connection] = {}
        self._listener: Any = None
        self._handshakes: set[asyncio.Task] = set()
        self._endpoints: set[Any] = set()
        self._background: set[asyncio.Task] = set()
        self._mesh_changed: asyncio.Event | None = None
        self._fatal: SparseCollError | None = None
        self._runtime_held = False

    @property
    def open_endpoints(self) -> int:
        """UCX endpoints this transport created or accepted and has not closed yet."""
        return len(self._endpoints)

    # ----------------------------------------------------------------- set-up
    async def listen(self, host: str) -> str:
        self._mesh_changed = asyncio.Event()
        ucx_runtime.acquire(self.rank)
        self._runtime_held = True
        try:
            self._listener = ucx_runtime.create_listener(self._on_endpoint)
        except UCX_ERRORS as error:
            raise RendezvousError(f"cannot listen with UCX: {error}", rank=self.rank) from None
        port = self._listener.port
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def connect(self, addresses: Sequence[str], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        outgoing = [asyncio.ensure_future(self._connect_to(peer, addresses[peer], deadline))
                    for peer in range(self.rank)]
        try:
            while True:
                if self._fatal is not None:
                    raise self._fatal
                for task in outgoing:
                    if task.done() and task.exception() is not None:
                        raise task.exception()
                if len(self._connections) == self.size - 1 and all(t.done() for t in outgoing):
                    break
                if self.mailbox.error is not None:
                    raise copy_error(self.mailbox.error)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    missing = sorted(set(range(self.size)) - set(self._connections) - {self.rank})
                    raise CollectiveTimeoutError(
                        f"mesh incomplete after {timeout:.1f} s; no connection with ranks {missing}",
                        rank=self.rank, peer=missing[0] if missing else None)
                self._mesh_changed.clear()
                waiter = asyncio.ensure_future(self._mesh_changed.wait())
                await asyncio.wait([waiter, *(t for t in outgoing if not t.done())],
                                   timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
        finally:
            for task in outgoing:
                task.cancel()
            await asyncio.gather(*outgoing, return_exceptions=True)
            await self._stop_listening()

    async def _connect_to(self, peer: int, address: str, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        while True:
            try:
                endpoint = await self._open_endpoint(
                    host, int(port), max(0.1, min(HANDSHAKE_TIMEOUT, deadline - loop.time())))
                break
            except (*UCX_ERRORS, asyncio.TimeoutError) as error:
                if loop.time() > deadline:
                    raise RendezvousError(f"cannot connect to {address}: {error!r}",
                                          rank=self.rank, peer=peer) from None
                await asyncio.sleep(0.05)
        try:
            await asyncio.wait_for(
                connect_handshake(UcxChannel(endpoint), self.secret, self.group_id, self.rank,
                                  self.size, peer),
                max(0.1, min(HANDSHAKE_TIMEOUT, deadline - loop.time())))
        except BaseException as error:
            await self._discard_endpoint(endpoint)
            if isinstance(error, (OSError, asyncio.TimeoutError)):
                raise RendezvousError(f"handshake with {address} failed: {error!r}",
                                      rank=self.rank, peer=peer) from None
            raise
        self._add_connection(peer, endpoint)

    async def _open_endpoint(self, host: str, port: int, timeout: float) -> Any:
        """Create an endpoint; if our caller is cancelled meanwhile, close it once created.

        Cancelling ucxx's endpoint creation half-way would leak the UCX endpoint (and leave
        the listener's side with a failed exchange), so creation always runs to its end.
        """
        creation = asyncio.ensure_future(ucx_runtime.create_endpoint(host, port, timeout))
        try:
            endpoint = await asyncio.shield(creation)
        except asyncio.CancelledError:
            self._background.add(creation)
            creation.add_done_callback(self._close_orphan)
            raise
        self._endpoints.add(endpoint)
        return endpoint

    def _close_orphan(self, creation: asyncio.Future) -> None:
        self._background.discard(creation)
        if not creation.cancelled() and creation.exception() is None:
            self._in_background(ucx_runtime.close_endpoint(creation.result()))

    async def _on_endpoint(self, endpoint: Any) -> None:
        """Listener callback: authenticate one incoming endpoint, or drop it as a stray."""
        self._endpoints.add(endpoint)
        if self._listener is None:
            await self._discard_endpoint(endpoint)
            return
        task = asyncio.current_task()
        self._handshakes.add(task)
        try:
            peer = await asyncio.wait_for(
                accept_handshake(UcxChannel(endpoint), self.secret, self.group_id, self.rank, self.size),
                HANDSHAKE_TIMEOUT)
            if peer in self._connections:
                raise RendezvousError(f"second connection claiming rank {peer}", rank=self.rank)
        except asyncio.CancelledError:
            await self._discard_endpoint(endpoint)
            return
        except (SparseCollError, OSError, asyncio.TimeoutError) as error:
            await self._discard_endpoint(endpoint)
            if isinstance(error, SparseCollError) and error.peer is not None:
                self._fatal = self._fatal or error
            else:
                stray = error if isinstance(error, SparseCollError) else FrameError(
                    f"stray connection dropped: {error!r}", rank=self.rank)
                self.rejected.append(stray)
                log.warning("rank %d dropped a connection: %s", self.rank, stray)
            self._mesh_changed.set()
            return
        finally:
            self._handshakes.discard(task)
        self._add_connection(peer, endpoint)

    def _add_connection(self, peer: int, endpoint: Any) -> None:
        self._connections[peer] = _Connection(self, endpoint, peer)
        self._mesh_changed.set()

    async def _discard_endpoint(self, endpoint: Any) -> None:
        self._endpoints.discard(endpoint)
        await ucx_runtime.close_endpoint(endpoint)

    async def _stop_listening(self) -> None:
        """Close the listener once no accept handler runs, so none outlives it."""
        if self._listener is None:
            return
        listener, self._listener = self._listener, None
        for task in list(self._handshakes):
            task.cancel()
        await ucx_runtime.close_listener(listener)

    # ----------------------------------------------------------------- data
    async def send(self, peer: int, header: FrameHeader, payload: Sequence[Buffer] = ()) -> None:
        connection = self._connections.get(peer)
        if connection is None or connection.closed and not connection.bye_received:
            raise lost_peer_error(self.rank, peer, "no open connection")
        try:
            await connection.send(self._frame_messages(header, payload))
        except asyncio.CancelledError:
            if connection.tx_broken:
                self.on_failure(GroupAbortedError(
                    f"a send to rank {peer} was cancelled on a failed endpoint", rank=self.rank, peer=peer))
            raise

    def _frame_messages(self, header: FrameHeader, payload: Sequence[Buffer]) -> list[Any]:
        """The UCX messages of one frame: header (with inline payload or size table), then data."""
        buffers = [buffer for buffer in payload if ucx_runtime.nbytes(buffer)]
        if any(is_device(buffer) for buffer in buffers) and not ucx_runtime.cuda_support():
            raise InvalidArgumentError(
                "a device buffer was given but UCX has no CUDA transport; add cuda_copy "
                "(and cuda_ipc) to UCX_TLS", rank=self.rank)
        if 0 < header.length <= INLINE_MAX and not any(is_device(buffer) for buffer in buffers):
            message = bytearray(encode_header(dataclasses.replace(header, flags=header.flags | INLINE_PAYLOAD)))
            for buffer in buffers:
                message += memoryview(buffer).cast("B")
            return [message]
        if len(buffers) > 1:
            if len(buffers) > MAX_SEGMENTS:
                raise InvalidArgumentError(f"a frame holds at most {MAX_SEGMENTS} buffers", rank=self.rank)
            sizes = [ucx_runtime.nbytes(buffer) for buffer in buffers]
            table = _COUNT.pack(len(sizes)) + struct.pack(f"<{len(sizes)}Q", *sizes)
            flagged = dataclasses.replace(header, flags=header.flags | SEGMENTED_PAYLOAD)
            return [encode_header(flagged) + table, *buffers]
        return [encode_header(header), *buffers]

    def peer_lost(self, peer: int, detail: str) -> None:
        error = lost_peer_error(self.rank, peer, detail)
        self.mailbox.peer_closed(peer, error)
        self.on_failure(error)
        if self._mesh_changed is not None:
            self._mesh_changed.set()

    def send_abort(self, error: SparseCollError) -> None:
        payload = encode_abort(self.rank, error)
        header = FrameHeader(kind=Kind.ABORT, context=0, seq=0, tag=0, length=len(payload))
        for connection in self._connections.values():
            if not (connection.closed or connection.tx_broken):
                self._in_background(self._send_quietly(connection, header, payload, 1.0))

    def _in_background(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_quietly(self, connection: _Connection, header: FrameHeader, payload: bytes,
                            timeout: float) -> None:
        try:
            await asyncio.wait_for(connection.send(self._frame_messages(header, [payload])), timeout)
        except (SparseCollError, asyncio.TimeoutError):
            pass

    def fail_pending_sends(self, error: SparseCollError) -> None:
        for connection in self._connections.values():
            connection.fail_writer(error)

    async def close(self, linger: float = 1.0) -> None:
        if self.closing:
            return
        await self._stop_listening()
        if self._background:
            await asyncio.wait(list(self._background), timeout=linger)
        self.closing = True
        bye = FrameHeader(kind=Kind.BYE, context=0, seq=0, tag=0, length=0)
        await asyncio.gather(*(self._send_quietly(connection, bye, b"", linger)
                               for connection in self._connections.values()
                               if not (connection.closed or connection.tx_broken)))
        waiting = [c.eof for c in self._connections.values() if not c.eof.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=linger)
        for connection in self._connections.values():
            self._endpoints.discard(connection.endpoint)
            await connection.release()
        for endpoint in list(self._endpoints):
            await self._discard_endpoint(endpoint)
        if self._background:
            await asyncio.wait(list(self._background), timeout=linger)
        for task in list(self._background):
            task.cancel()
        if self._runtime_held:
            self._runtime_held = False
            ucx_runtime.release()
