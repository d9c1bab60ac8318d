"""The process's UCX runtime for the UCX transport: ucxx's context, endpoints, buffers.

ucxx keeps one UCX context per process, bound to the event loop that created it. By default
:class:`EventProgress` progresses it on that loop (ucxx's own modes: see
:data:`PROGRESS_MODES`); in ucxx's thread mode its notifier thread keeps the interpreter
alive until it is stopped. This module creates the context when the first
UcxTransport of the process starts listening and shuts it down (``ucxx.reset()``, which also
checks that no endpoint or listener is left) when the last one closes, so sequential
``asyncio.run`` calls and groups each get a fresh, correctly bound context.

Everything that touches ucxx directly lives here, behind guarded imports: the package
imports without ucxx. The event driver submits requests through ucxx's endpoint handles and
tags (``Endpoint._ep``, ``_tags``) and registers itself in ucxx's per-loop progress registry,
since ucxx's asyncio API only awaits requests by spinning the loop outside thread mode. The
package imports without CUDA libraries too (device arrays are recognised by their
``__cuda_array_interface__`` and handed to UCX untouched).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import socket
import weakref
from collections.abc import Callable
from typing import Any

from sparsecoll.errors import FrameError, InvalidArgumentError, RendezvousError
from sparsecoll.transport.device import device_nbytes, interface_of, is_device, write_bytes

log = logging.getLogger(__name__)

# UCX reads this when its library loads (at ``import ucxx``); ucxx itself sets UCX_* variables
# that UCX would otherwise report as unused
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
try:
    import ucxx
    from ucxx._lib.arr import Array
    from ucxx._lib.libucxx import UCXAddress
    from ucxx.exceptions import UCXCloseError, UCXError
    from ucxx.types import Tag, TagMaskFull
except ImportError as error:  # the 'ucx' extra is not installed
    ucxx = None
    _IMPORT_ERROR: ImportError | None = error

    class UCXError(Exception):
        """Stands in for ucxx's error class when ucxx is absent (never raised)."""
else:
    _IMPORT_ERROR = None

UCX_ERRORS: tuple[type[BaseException], ...] = (UCXError,)
"""What ucxx raises for failed, cancelled or truncated transfers and endpoints."""

UCX_DEFAULTS = {"TCP_TX_SEG_SIZE": "256k", "TCP_RX_SEG_SIZE": "256k",
                "POSIX_FIFO_SIZE": "1024", "SYSV_FIFO_SIZE": "1024"}
"""UCX options applied unless the environment sets them (``UCX_TCP_...``): bigger TCP segments
move large messages 2-3x faster on loopback and Ethernet; a 1024-element shared-memory FIFO
(UCX's default: 256) lets a sender park less often on a receiver that has not drained it yet,
which made 16 MiB allreduces among 4 ranks on 2 cores 2.2-2.6x faster (about 8 MiB of shared
memory per transport and process). Transports not in use ignore their options."""

PROGRESS_MODES = ("event", "thread", "blocking", "polling")
"""How UCX is progressed (``SPARSECOLL_UCX_PROGRESS``, default "event"). "event": our
:class:`EventProgress` on the event loop, woken by UCX's epoll descriptor or a new request, and
idle otherwise. The others are ucxx's own modes: "thread" completes requests through ucxx's
progress and notifier threads (a thread hop per completion: ~300 us per small message on a
busy host); "blocking" and "polling" progress on the event loop, but every pending request
then spins the loop until it completes, so ranks that wait busy-loop."""
LISTENER_DRAIN_SECONDS = 5.0
ENDPOINT_CLOSE_NS = 2 * 10**9
ENDPOINT_CLOSE_SECONDS = 2.0


class _State:
    users = 0
    owned = False
    loop: asyncio.AbstractEventLoop | None = None
    mode = "event"
    driver: EventProgress | None = None
    shared_memory = False
    flushed_on_close: weakref.WeakSet = weakref.WeakSet()
    """Open endpoints without failure handling (UCX flushes them on close)."""


FALLBACK_FIRST = 0.001
FALLBACK_MAX = 0.1
"""Seconds between progress calls without an event while requests are pending: from the first
value, doubling while none completes, up to the second."""


class EventProgress:
    """Progresses a UCX worker on the event loop only when there is something to do.

    UCX's worker exposes an epoll descriptor that becomes readable once the worker is armed
    and an event arrives. Each wake-up (that descriptor, or a newly submitted request)
    progresses the worker until it is idle, completes the futures of finished requests, and
    re-arms; when arming finds more work it progresses again on the next loop iteration. A
    waiting rank thus sleeps in the loop's own ``epoll_wait``, with no thread hops and no
    spinning.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._worker: Any = None
        self._descriptor: int | None = None
        self._pending: list[tuple[Any, asyncio.Future, Any]] = []
        self._scheduled = False
        self._fallback: asyncio.TimerHandle | None = None
        self._backoff = FALLBACK_FIRST

    def start(self, worker: Any) -> None:
        """Drive ``worker`` (created for blocking progress) from now on."""
        worker.init_blocking_progress_mode()
        self._worker = worker
        self._descriptor = worker.epoll_file_descriptor
        self.loop.add_reader(self._descriptor, self._progress)
        self.wake()

    def stop(self) -> None:
        """Stop driving the worker; requests still pending are left to the endpoints' close."""
        if self._fallback is not None:
            self._fallback.cancel()
            self._fallback = None
        if self._descriptor is not None:
            self.loop.remove_reader(self._descriptor)
        self._worker = self._descriptor = None
        self._pending.clear()

    def wake(self) -> None:
        """Progress the worker on the next loop iteration (once, however often called)."""
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._progress)

    def _progress(self) -> None:
        self._scheduled = False
        worker = self._worker
        if worker is None:
            return
        worker.progress()
        if self._pending and self._complete():
            self._backoff = FALLBACK_FIRST
        if not worker.arm():
            self.wake()
        elif self._pending and self._fallback is None:
            # UCX raises no event for some progress it owes (a send parked until a full
            # shared-memory FIFO drains): look again after a delay that grows while idle
            self._fallback = self.loop.call_later(self._backoff, self._on_fallback)
            self._backoff = min(2 * self._backoff, FALLBACK_MAX)

    def _on_fallback(self) -> None:
        self._fallback = None
        self._progress()

    def _complete(self) -> bool:
        """Settle the futures of completed requests; whether any completed."""
        still = []
        for entry in self._pending:
            request, future, _buffer = entry
            if request.completed:
                self._settle(request, future)
            else:
                still.append(entry)
        completed = len(still) < len(self._pending)
        self._pending = still
        return completed

    def track(self, request: Any, future: asyncio.Future, buffer: Any) -> None:
        """Complete ``future`` with ``request`` (its UCX error as the exception).

        ``buffer`` stays referenced until the request completes, even if the future's waiter
        is cancelled: UCX owns that memory until then (an endpoint's close cancels it).
        """
        if request.completed:
            self._settle(request, future)
            return
        self._pending.append((request, future, buffer))
        self.wake()

    @staticmethod
    def _settle(request: Any, future: asyncio.Future) -> None:
        if future.done():
            return
        try:
            request.check_error()
        except UCXError as error:
            future.set_exception(error)
        else:
            future.set_result(None)


def progress_mode() -> str:
    """The progress mode ``SPARSECOLL_UCX_PROGRESS`` asks for (see :data:`PROGRESS_MODES`)."""
    mode = os.environ.get("SPARSECOLL_UCX_PROGRESS", "event").strip().lower() or "event"
    if mode not in PROGRESS_MODES:
        raise InvalidArgumentError(f"SPARSECOLL_UCX_PROGRESS={mode!r}: choose from {', '.join(PROGRESS_MODES)}")
    if mode == "event" and not hasattr(_application_context(), "ProgressTasks"):
        log.warning("this ucxx has no per-loop progress registry; using its 'thread' progress mode")
        return "thread"
    return mode


def available() -> bool:
    """True when ucxx can be imported."""
    return ucxx is not None


def import_error() -> str:
    """Why ucxx could not be imported ('' when it could)."""
    return "" if _IMPORT_ERROR is None else f"{type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}"


def acquire(rank: int) -> None:
    """Start (or join) the process's UCX context on the running event loop."""
    loop = asyncio.get_running_loop()
    if _State.users and _State.owned and _State.loop is not loop:
        raise RendezvousError("all UCX groups of a process must run on one event loop", rank=rank)
    if ucxx.core._ctx is None:
        mode = progress_mode()
        driver = None
        if mode == "event":
            # ucxx starts its own progress for a loop unless one is registered for it
            driver = EventProgress(loop)
            _progress_tasks()[loop] = driver
        ucx_mode = "blocking" if mode == "event" else mode
        allowed = os.environ.get("UCX_TLS", "all")
        shared_memory = shared_memory_asked() and shared_memory_allowed(allowed)
        # the transports the environment allows, less those that would make the payload
        # endpoint abort a rank (a setting UCX must take over the environment's UCX_TLS)
        transports = {"TLS": without_peer_memory(allowed)} if shared_memory else {}
        defaults = {key: value for key, value in UCX_DEFAULTS.items() if f"UCX_{key}" not in os.environ}
        try:
            ucxx.init(options={**defaults, **transports}, progress_mode=ucx_mode,
                      enable_python_future=mode == "thread")
        except UCXError:
            ucxx.reset()
            if driver is not None:
                _progress_tasks()[loop] = driver
            ucxx.init(options=transports, progress_mode=ucx_mode, enable_python_future=mode == "thread")
        if driver is not None:
            driver.start(ucxx.core._ctx.worker)
        _State.owned, _State.loop, _State.mode, _State.driver = True, loop, mode, driver
        _State.shared_memory = shared_memory
    _State.users += 1


def release() -> None:
    """Leave the context; the last user shuts it down (and its threads) if we started it."""
    _State.users -= 1
    if _State.users or not _State.owned:
        return
    if _State.driver is not None:
        _State.driver.stop()
        _progress_tasks().pop(_State.loop, None)
    _State.owned, _State.loop, _State.driver, _State.shared_memory = False, None, None, False
    context = ucxx.core._ctx
    if context is None:
        return
    # Wake the notifier thread now rather than at its next 1 s poll, and join it. Then leave
    # the notifier marked stopped with nothing pending: a waking thread consumes the stop
    # mark, a late completion sets "ready", and the worker's destructor warns about either.
    worker = context.worker
    if _State.mode == "thread":  # only that mode has notifier threads to stop
        worker.stop_request_notifier_thread()
        context.stop_notifier_thread()
        for _ in range(8):
            if worker.wait_request_notifier(period_ns=1) == ucxx._lib.libucxx.PythonRequestNotifierWaitState.Timeout:
                break
        worker.stop_request_notifier_thread()
    del context, worker
    try:
        ucxx.reset()
    except UCXError as error:
        log.warning("UCX context still referenced at shutdown (leaked endpoint?): %s", error)


def _application_context() -> Any:
    from ucxx._lib_async import application_context

    return application_context


def _progress_tasks() -> dict:
    """ucxx's registry of the progress object driving each event loop."""
    return _application_context().ProgressTasks


def post_send(endpoint: Any, buffer: Any, tag: int | None = None) -> asyncio.Future:
    """Submit a send of ``buffer`` (one tag message on ``endpoint``) now; completes with it.

    ``tag`` defaults to the endpoint's own. The future is already done when UCX completed the
    send on submission (small eager messages); a UCX error becomes its exception.
    """
    tag = endpoint._tags["msg_send"] if tag is None else tag
    if _State.driver is None:
        return asyncio.ensure_future(endpoint.send(buffer, tag=tag, force_tag=True))
    return _post(lambda array: _open_handle(endpoint).tag_send(array, Tag(tag)), buffer)


def post_recv(endpoint: Any, buffer: Any) -> asyncio.Future:
    """Post a receive of the next tag message on ``endpoint`` into ``buffer`` now."""
    if _State.driver is None:
        return asyncio.ensure_future(endpoint.recv(buffer))
    return _post(lambda array: _open_handle(endpoint).tag_recv(array, Tag(endpoint._tags["msg_recv"]), TagMaskFull),
                 buffer)


async def recv(endpoint: Any, buffer: Any) -> None:
    """Receive the next tag message on ``endpoint`` into ``buffer``."""
    await post_recv(endpoint, buffer)


def _post(submit: Callable[[Any], Any], buffer: Any) -> asyncio.Future:
    """``submit(array)`` a request for ``buffer`` and return the future the driver completes."""
    driver = _State.driver
    future = driver.loop.create_future()
    try:
        array = Array(buffer)
        request = submit(array)
    except UCXError as error:
        future.set_exception(error)
        return future
    driver.track(request, future, array)
    return future


class PayloadEndpoint:
    """A second endpoint to a peer on the same host that carries only payload messages.

    UCX will not use shared memory (``sysv``/``posix``) on an endpoint with peer-failure
    handling, so the connection's own endpoint (which has it, and whose keepalive detects a
    dead peer) would move every byte over TCP between local ranks. This endpoint, created
    from the peer's worker address without failure handling, lets UCX pick shared memory for
    payloads; headers, ABORT and BYE stay on the connection's endpoint, which still reports
    the peer's failure. The context then leaves out :data:`PEER_MEMORY_TRANSPORTS`, whose
    failures UCX cannot report on such an endpoint. Messages are tagged with the connection's
    tags xor :data:`PAYLOAD_TAG` and received on the worker, in the order they were sent.
    """

    def __init__(self, connection_endpoint: Any, endpoint: Any) -> None:
        self.endpoint = endpoint
        self._send_tag = connection_endpoint._tags["msg_send"] ^ PAYLOAD_TAG
        self._recv_tag = connection_endpoint._tags["msg_recv"] ^ PAYLOAD_TAG

    def post_send(self, buffer: Any) -> asyncio.Future:
        """Submit a send of ``buffer`` now (see :func:`post_send`)."""
        return post_send(self.endpoint, buffer, self._send_tag)

    async def recv(self, buffer: Any) -> None:
        """Receive the peer's next payload message into ``buffer``."""
        context = ucxx.core._get_ctx()
        if _State.driver is None:
            await context.recv(buffer, self._recv_tag)
            return
        await _post(lambda array: context.worker.tag_recv(array, Tag(self._recv_tag), TagMaskFull), buffer)


PAYLOAD_TAG = 0x5343_5041_594C_4F44
"""Xor'ed into a connection's tags to tag its payload endpoint's messages."""
SHARED_MEMORY_TRANSPORTS = frozenset({"posix", "sysv"})
"""UCX's shared-memory transports that copy through segments both processes map."""
PEER_MEMORY_TRANSPORTS = ("cma", "knem", "xpmem")
"""UCX's shared-memory transports that copy straight out of the peer's address space. When the
peer exits or frees the buffer during such a copy on an endpoint without failure handling,
UCX aborts the receiving process (measured: ``cma``, a sender SIGKILLed mid-payload, 4 of 4
runs), so they are left out whenever payload endpoints are on."""
SHARED_MEMORY_ALIASES = ("sm", "shm", "mm")
"""UCX_TLS names that stand for several shared-memory transports."""


def shared_memory_asked() -> bool:
    """``SPARSECOLL_UCX_SHARED_MEMORY``: ``1`` (the default) or ``0``."""
    setting = os.environ.get("SPARSECOLL_UCX_SHARED_MEMORY", "1").strip() or "1"
    if setting not in ("0", "1"):
        raise InvalidArgumentError(f"SPARSECOLL_UCX_SHARED_MEMORY={setting!r}: use 1 (on) or 0 (off)")
    return setting == "1"


def shared_memory_wanted() -> bool:
    """Whether this rank asks its local peers for a payload endpoint.

    True when the context was created here with ``SPARSECOLL_UCX_SHARED_MEMORY`` on and a
    ``UCX_TLS`` that allows ``posix`` or ``sysv``; a context someone else created may allow
    transports that are not safe without failure handling, so it never gets one.
    """
    return _State.owned and _State.shared_memory


def _transport_names(setting: str) -> tuple[bool, list[str]]:
    """``UCX_TLS`` split into (is an exclusion list, lower-case names)."""
    setting = setting.replace(" ", "").lower()
    return setting.startswith("^"), [name for name in setting.lstrip("^").split(",") if name]


def shared_memory_allowed(setting: str) -> bool:
    """Whether the ``UCX_TLS`` value ``setting`` lets UCX use ``posix`` or ``sysv``."""
    excluded, names = _transport_names(setting)
    if excluded:
        return not set(names) & {*SHARED_MEMORY_ALIASES, "all"} and not set(names) >= SHARED_MEMORY_TRANSPORTS
    return bool(set(names) & {*SHARED_MEMORY_TRANSPORTS, *SHARED_MEMORY_ALIASES, "all"})


def without_peer_memory(setting: str) -> str:
    """The ``UCX_TLS`` value ``setting`` less :data:`PEER_MEMORY_TRANSPORTS`.

    Shared-memory aliases become ``posix,sysv``; ``all`` (or unset) and exclusion lists gain
    the exclusions: ``"sm,tcp"`` -> ``"posix,sysv,tcp"``, ``"all"`` -> ``"^cma,knem,xpmem"``.
    """
    excluded, names = _transport_names(setting)
    if excluded or "all" in names:
        kept = [name for name in names if name not in PEER_MEMORY_TRANSPORTS] if excluded else []
        return "^" + ",".join([*kept, *PEER_MEMORY_TRANSPORTS])
    kept = []
    for name in names:
        expanded = sorted(SHARED_MEMORY_TRANSPORTS) if name in SHARED_MEMORY_ALIASES else [name]
        kept += [item for item in expanded if item not in PEER_MEMORY_TRANSPORTS and item not in kept]
    return ",".join(kept)


@functools.cache
def host_identity() -> bytes:
    """16 bytes naming this host's running kernel: equal for processes that can share memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as source:
            boot = source.read().strip()
    except OSError:
        boot = b""
    return hashlib.sha256(socket.gethostname().encode() + b"/" + boot).digest()[:16]


def worker_address() -> bytes:
    """This process's UCX worker address, as a peer needs it to reach us."""
    return bytes(ucxx.core._get_ctx().worker.address)


async def create_payload_endpoint(connection_endpoint: Any, address: bytes) -> PayloadEndpoint:
    """A :class:`PayloadEndpoint` to the worker at ``address`` (without peer-failure handling).

    UCX's failures raise ConnectionResetError, as the handshake's channel does.
    """
    try:
        endpoint = await ucxx.create_endpoint_from_worker_address(
            UCXAddress.create_from_buffer(address), endpoint_error_handling=False)
    except UCXError as error:
        raise ConnectionResetError(f"cannot open the payload endpoint: {describe(error)}") from None
    _State.flushed_on_close.add(endpoint)
    return PayloadEndpoint(connection_endpoint, endpoint)


def _open_handle(endpoint: Any) -> Any:
    """ucxx's endpoint handle behind ``endpoint``; raises its UCX error if it failed or closed."""
    handle = endpoint._ep
    if handle is None:
        raise UCXCloseError("Endpoint closed")
    handle.raise_on_error()
    if not handle.alive:
        raise UCXCloseError("Endpoint closed")
    return handle


def cuda_support() -> bool:
    """Whether UCX can move device memory (a CUDA transport is enabled in UCX_TLS)."""
    return bool(ucxx.core._get_ctx().context.cuda_support)


def create_listener(callback: Callable[[Any], Any], port: int = 0) -> Any:
    """A UCX listener on ``port`` (0: a free one) of every interface; ``callback(endpoint)``
    per peer. Raises UCX's error when the port is taken."""
    return ucxx.create_listener(callback, port=port, endpoint_error_handling=True)


async def create_endpoint(host: str, port: int, timeout: float) -> Any:
    """Connect to a UCX listener at ``host:port``."""
    return await ucxx.create_endpoint(host, port, endpoint_error_handling=True,
                                      connect_timeout=timeout)


async def close_endpoint(endpoint: Any, timeout: float = ENDPOINT_CLOSE_SECONDS) -> None:
    """Close ``endpoint``, cancelling its receives, within about ``timeout`` seconds.

    An endpoint with failure handling closes at once (UCX's force mode), after one progress
    call that lets queued messages out (a handshake's rejection must reach the peer). One
    without (a :class:`PayloadEndpoint`) is flushed first, which needs the peer to progress:
    ucxx's own close would then spin in the loop's thread, forever if the peer has moved on
    (measured: 30 s, until the peer exited). So on the event driver that close is a request
    awaited like any other, and one that times out is abandoned (UCX keeps what it holds
    until the process exits) rather than blocking the rank.
    """
    if endpoint is None:
        return
    if endpoint in _State.flushed_on_close and _State.driver is not None:
        _State.flushed_on_close.discard(endpoint)  # ucxx hands back no request for a second close
        future = _State.driver.loop.create_future()
        try:
            _State.driver.track(endpoint._ep.close(), future, None)
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except UCXError as error:
            log.debug("closing a UCX endpoint: %s", error)
        except asyncio.TimeoutError:
            log.debug("a UCX endpoint did not finish closing within %.1f s", timeout)
    try:
        await endpoint.close(period=ENDPOINT_CLOSE_NS)  # at once for an endpoint closing already
    except UCXError as error:
        log.debug("closing a UCX endpoint: %s", error)


async def close_listener(listener: Any) -> None:
    """Close ``listener`` once its accept handlers have returned (ucxx warns otherwise)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LISTENER_DRAIN_SECONDS
    while listener.active_clients and loop.time() < deadline:
        await asyncio.sleep(0.001)
    listener.close()


def nbytes(buffer: Any) -> int:
    """Size in bytes of a host or device buffer (a device one's from its interface; a
    non-contiguous one is refused)."""
    if is_device(buffer):
        return device_nbytes(buffer)
    return memoryview(buffer).nbytes


def as_message(buffer: Any) -> Any:
    """A buffer as UCX takes it: device arrays untouched (contiguous ones only), host buffers
    as flat byte views."""
    if is_device(buffer):
        interface_of(buffer)
        return buffer
    if isinstance(buffer, (bytes, bytearray)):
        return buffer
    view = memoryview(buffer)
    if not view.c_contiguous:
        raise FrameError("only contiguous buffers can be sent")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def copy_into(sink: Any, data: memoryview) -> None:
    """Copy a small host payload into ``sink`` (host memoryview or device array)."""
    if not is_device(sink):
        sink[:len(data)] = data
        return
    write_bytes(sink, data)


def describe(error: BaseException) -> str:
    """``error`` as text, with its tracebacks cut.

    ucxx's frames in a traceback hold the UCX context; an exception kept anywhere (a task's
    result, an error's ``__context__``) would keep the context alive past ``ucxx.reset()``.
    """
    text = f"{type(error).__name__}: {error}"
    seen: BaseException | None = error
    while seen is not None:
        following = seen.__context__ or seen.__cause__
        seen.__traceback__ = seen.__context__ = seen.__cause__ = None
        seen = following
    return text


async def attempt(operation: Any) -> str:
    """Await a ucxx operation; '' on success, else the error as text (see :func:`describe`)."""
    try:
        await operation
    except UCXError as error:
        return describe(error)
    return ""


class UcxChannel:
    """A UCX endpoint as the handshake's FrameChannel: one tag message per write."""

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint

    async def read(self, size: int) -> bytes:
        buffer = bytearray(size)
        failure = await attempt(recv(self.endpoint, buffer))
        if "truncated" in failure.lower():
            raise FrameError(f"handshake message longer than the expected {size} bytes")
        if failure:
            raise ConnectionResetError(f"UCX endpoint failed during the handshake: {failure}")
        return bytes(buffer)

    async def write(self, data: bytes) -> None:
        failure = await attempt(post_send(self.endpoint, bytearray(data)))
        if failure:
            raise ConnectionResetError(f"UCX endpoint failed during the handshake: {failure}")
