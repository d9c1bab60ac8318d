"""Transport over UCX through ucxx's asyncio API: host and GPU buffers, any UCX fabric.

The same mesh, frames, HMAC handshake, deadlines, ABORT and BYE as the TCP transport; only
the way bytes move differs. Each pair of ranks shares one UCX endpoint (the higher rank
connects to the lower rank's listener); :mod:`sparsecoll.transport.ucx_connection` turns
frames into UCX tag messages, receiving large payloads straight into the caller's array so
that UCX's rendezvous protocol moves them (RDMA on InfiniBand, CUDA IPC between GPUs).
Device buffers (anything with ``__cuda_array_interface__``: cupy, torch CUDA tensors, Numba
device arrays) are handed to UCX as they are, on both sides, when ``UCX_TLS`` has a CUDA
transport (:meth:`UcxTransport.receives_device_memory`); not yet run on a GPU.

Choosing the fabric follows UCX's own conventions, so the same code runs anywhere:

* ``UCX_TLS`` lists the transports UCX may use. Unset (``all``) lets UCX pick the best per
  pair of ranks: shared memory (``sm``: posix, sysv; see below) inside a host, InfiniBand /
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
``host:port`` as for the TCP transport. These endpoints have UCX's peer-failure handling (a
dead peer fails them at once), and UCX therefore never puts shared memory on them. So two
ranks on one host whose ``UCX_TLS`` allows shared memory (unset, or naming ``sm``, ``posix``
or ``sysv``) agree after the handshake to open a second endpoint, from each other's worker
address and without failure handling, that carries only payloads, so bulk data moves
through shared memory; headers, ABORT and BYE keep the first endpoint, which still reports a
dead peer (see :class:`~sparsecoll.transport.ucx_runtime.PayloadEndpoint`). While this is on
(``SPARSECOLL_UCX_SHARED_MEMORY=1``, the default; ``0`` turns it off and leaves ``UCX_TLS``
as it is), the UCX context leaves out ``cma``, ``knem`` and ``xpmem``: UCX aborts a process
whose copy out of a dead peer's memory fails on such an endpoint.

ucxx keeps one UCX context per process, bound to the event loop that created it; every
UcxTransport of the process shares it, and the last one to close shuts it down so the
process exits cleanly.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Sequence
from typing import Any

from sparsecoll.errors import (
    AuthenticationError,
    FrameError,
    InvalidArgumentError,
    RendezvousError,
    SparseCollError,
)
from sparsecoll.transport import ucx_runtime
from sparsecoll.transport.base import Buffer, Transport, port_range
from sparsecoll.transport.handshake import accept_handshake, connect_handshake
from sparsecoll.transport.ucx_connection import UcxConnection
from sparsecoll.transport.ucx_runtime import UCX_ERRORS, PayloadEndpoint, UcxChannel
from sparsecoll.wire import FrameHeader, Kind, encode_abort


HANDSHAKE_TIMEOUT = 30.0
CONNECT_ATTEMPTS = 3
CONNECT_TIMEOUT = 5.0
"""Seconds one endpoint creation may take (ucxx waits that long even for an unreachable peer)."""
LOCALITY = struct.Struct("<4s?16sI")
"""After the handshake, each side's: magic, wants a payload endpoint, host identity, length
of the worker address that follows."""
LOCALITY_MAGIC = b"SCLO"
LOCALITY_SIZE = 4096
REJECTION_LINGER = 1.0
"""Seconds a rank that failed a handshake waits for the peer to close first."""


class UcxTransport(Transport):
    """A full mesh of UCX endpoints, one per pair of ranks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not ucx_runtime.available():
            raise InvalidArgumentError(
                "the 'ucx' backend needs ucxx: pip install 'sparsecoll[ucx]' "
                f"({ucx_runtime.import_error()})", rank=self.rank)
        self.closing = False
        self._connections: dict[int, UcxConnection] = {}
        self._listener: Any = None
        self._handshakes: set[asyncio.Task] = set()
        self._endpoints: set[Any] = set()
        self._background: set[asyncio.Task] = set()
        self._mesh_changed: asyncio.Event | None = None
        self._runtime_held = False

    @property
    def open_endpoints(self) -> int:
        """UCX endpoints this transport created or accepted and has not closed yet."""
        return len(self._endpoints)

    @property
    def payload_endpoints(self) -> int:
        """Connections whose payloads travel over a shared-memory payload endpoint."""
        return sum(connection.payload_endpoint is not None for connection in self._connections.values())

    def receives_device_memory(self) -> bool:
        """True when UCX_TLS enables a CUDA transport (``cuda_copy``, ``cuda_ipc``)."""
        return ucx_runtime.cuda_support()

    # ----------------------------------------------------------------- set-up
    async def listen(self, host: str) -> str:
        self._mesh_changed = asyncio.Event()
        ucx_runtime.acquire(self.rank)
        self._runtime_held = True
        failure = ""
        ports = port_range()
        for port in ports or (0,):
            try:
                self._listener = ucx_runtime.create_listener(self._on_endpoint, port)
                break
            except UCX_ERRORS as error:
                failure = ucx_runtime.describe(error)
        else:
            where = f" on any port of {ports.start}-{ports.stop - 1} (SPARSECOLL_PORT_RANGE)" if ports else ""
            raise RendezvousError(f"cannot listen with UCX{where}: {failure}", rank=self.rank)
        port = self._listener.port
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

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
            await asyncio.gather(*outgoing, return_exceptions=True)
            await self._stop_listening()

    async def _connect_to(self, peer: int, address: str, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        endpoint, failure = None, ""
        for _attempt in range(CONNECT_ATTEMPTS):
            # the listener is up before its address is published, so failures are rarely
            # transient (an unreachable peer: no UCX transport in common, e.g. UCX_TLS=sm)
            endpoint, failure = await self._open_endpoint(
                host, int(port), max(0.1, min(CONNECT_TIMEOUT, deadline - loop.time())))
            if endpoint is not None or loop.time() > deadline:
                break
            await asyncio.sleep(0.1)
        if endpoint is None:
            raise RendezvousError(f"cannot connect to {address} with UCX_TLS="
                                  f"{os.environ.get('UCX_TLS', 'all')}: {failure}", rank=self.rank, peer=peer)
        failure, payload_endpoint = "", None
        try:
            await asyncio.wait_for(
                connect_handshake(UcxChannel(endpoint), self.secret, self.group_id, self.rank,
                                  self.size, peer),
                max(0.1, min(HANDSHAKE_TIMEOUT, deadline - loop.time())))
            payload_endpoint = await asyncio.wait_for(
                self._open_payload_endpoint(endpoint, peer),
                max(0.1, min(HANDSHAKE_TIMEOUT, deadline - loop.time())))
        except (OSError, asyncio.TimeoutError) as error:
            failure = repr(error)
        except BaseException as error:
            await self._discard_endpoint(endpoint, rejected=isinstance(error, AuthenticationError))
            raise
        if failure:
            await self._discard_endpoint(endpoint)
            raise RendezvousError(f"handshake with {address} failed: {failure}", rank=self.rank, peer=peer)
        self._add_connection(peer, endpoint, payload_endpoint)

    async def _open_endpoint(self, host: str, port: int, timeout: float) -> tuple[Any, str]:
        """A new endpoint and '', or None and why not; a cancelled caller's endpoint is closed.

        Cancelling ucxx's endpoint creation half-way would leak the UCX endpoint (and leave
        the listener's side with a failed exchange), so creation always runs to its end.
        """
        creation = asyncio.ensure_future(ucx_runtime.create_endpoint(host, port, timeout))
        try:
            await asyncio.wait([creation])
        except asyncio.CancelledError:
            self._background.add(creation)
            creation.add_done_callback(self._close_orphan)
            raise
        if creation.exception() is not None:
            return None, ucx_runtime.describe(creation.exception())
        endpoint = creation.result()
        self._endpoints.add(endpoint)
        return endpoint, ""

    def _close_orphan(self, creation: asyncio.Future) -> None:
        self._background.discard(creation)
        if creation.cancelled():
            return
        if creation.exception() is not None:
            ucx_runtime.describe(creation.exception())
        else:
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
            payload_endpoint = await asyncio.wait_for(self._open_payload_endpoint(endpoint, peer),
                                                      HANDSHAKE_TIMEOUT)
        except asyncio.CancelledError:
            await self._discard_endpoint(endpoint)
            return
        except (SparseCollError, OSError, asyncio.TimeoutError) as error:
            # nothing before a proven secret touches the group (see Transport.drop_stray)
            await self._discard_endpoint(endpoint, rejected=isinstance(error, AuthenticationError))
            self.drop_stray(error if isinstance(error, SparseCollError) else FrameError(
                f"stray connection dropped: {error!r}", rank=self.rank))
            self._mesh_changed.set()
            return
        finally:
            self._handshakes.discard(task)
        self._add_connection(peer, endpoint, payload_endpoint)

    async def _open_payload_endpoint(self, endpoint: Any, peer: int) -> PayloadEndpoint | None:
        """After the handshake: a shared-memory payload endpoint if both ranks want one.

        Each side sends whether it wants one (on, and shared memory allowed by its
        ``UCX_TLS``), its host identity and its worker address; both open it only when both
        want it and the identities match, so the two sides always agree.
        """
        address, identity = ucx_runtime.worker_address(), ucx_runtime.host_identity()
        wants = ucx_runtime.shared_memory_wanted() and LOCALITY.size + len(address) <= LOCALITY_SIZE
        ours = LOCALITY.pack(LOCALITY_MAGIC, wants, identity, len(address) if wants else 0)
        channel = UcxChannel(endpoint)
        await channel.write((ours + (address if wants else b"")).ljust(LOCALITY_SIZE, b"\0"))
        theirs = await channel.read(LOCALITY_SIZE)
        magic, peer_wants, peer_identity, length = LOCALITY.unpack_from(theirs)
        if magic != LOCALITY_MAGIC or length > LOCALITY_SIZE - LOCALITY.size:
            raise FrameError(f"malformed locality message from rank {peer}", rank=self.rank, peer=peer)
        if not (wants and peer_wants and peer_identity == identity):
            return None
        payload_endpoint = await ucx_runtime.create_payload_endpoint(
            endpoint, theirs[LOCALITY.size:LOCALITY.size + length])
        self._endpoints.add(payload_endpoint.endpoint)
        return payload_endpoint

    def _add_connection(self, peer: int, endpoint: Any, payload_endpoint: PayloadEndpoint | None) -> None:
        self._connections[peer] = UcxConnection(self, endpoint, peer, payload_endpoint)
        self._mesh_changed.set()

    async def _discard_endpoint(self, endpoint: Any, rejected: bool = False) -> None:
        """Close ``endpoint``; after a failed authentication, once the peer has read why.

        UCX's force close drops messages not yet on the wire, so the peer could see a reset
        instead of the rejection and raise the wrong error; it closes its side when it has
        read it, which ends the wait here.
        """
        self._endpoints.discard(endpoint)
        if rejected:
            try:
                await asyncio.wait_for(UcxChannel(endpoint).read(1), REJECTION_LINGER)
            except (OSError, SparseCollError, asyncio.TimeoutError):
                pass
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
    async def _send_frame(self, connection: UcxConnection, header: FrameHeader,
                          payload: Sequence[Buffer]) -> None:
        await connection.send_frame(header, payload)

    def send_abort(self, error: SparseCollError) -> None:
        payload = encode_abort(self.rank, error)
        header = self.abort_header(len(payload))
        for connection in self._connections.values():
            if not (connection.closed or connection.tx_broken):
                self._in_background(self._send_quietly(connection, header, payload, 1.0))

    def _in_background(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_quietly(self, connection: UcxConnection, header: FrameHeader, payload: bytes,
                            timeout: float) -> None:
        try:
            await asyncio.wait_for(connection.send_frame(header, [payload]), timeout)
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
        # payload endpoints first: their flush needs the peer's progress, which it gives
        # while it waits in its own close for our BYE, but not once it has moved on
        await asyncio.gather(*(connection.close_payload_endpoint() for connection in self._connections.values()))
        bye = FrameHeader(kind=Kind.BYE, context=0, seq=0, tag=0, length=0)
        await asyncio.gather(*(self._send_quietly(connection, bye, b"", linger)
                               for connection in self._connections.values()
                               if not (connection.closed or connection.tx_broken)))
        waiting = [c.eof for c in self._connections.values() if not c.eof.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=linger)
        for connection in self._connections.values():
            self._endpoints.discard(connection.endpoint)
            if connection.payload_endpoint is not None:
                self._endpoints.discard(connection.payload_endpoint.endpoint)
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
