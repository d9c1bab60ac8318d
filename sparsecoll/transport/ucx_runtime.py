"""The process's UCX runtime for the UCX transport: ucxx's context, endpoints, buffers.

ucxx keeps one UCX context per process; with its progress thread and Python-future
notifier it is bound to the event loop that created it, and its notifier thread keeps the
interpreter alive until it is stopped. This module creates the context when the first
UcxTransport of the process starts listening and shuts it down (``ucxx.reset()``, which also
checks that no endpoint or listener is left) when the last one closes, so sequential
``asyncio.run`` calls and groups each get a fresh, correctly bound context.

Everything that touches ucxx directly lives here, behind guarded imports: the package
imports without ucxx, and without CUDA libraries (device arrays are recognised by their
``__cuda_array_interface__`` and handed to UCX untouched).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from sparsecoll.errors import FrameError, InvalidArgumentError, RendezvousError

log = logging.getLogger(__name__)

# UCX reads this when its library loads (at ``import ucxx``); ucxx itself sets UCX_* variables
# that UCX would otherwise report as unused
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
try:
    import ucxx
    from ucxx.exceptions import UCXError
except ImportError as error:  # the 'ucx' extra is not installed
    ucxx = None
    _IMPORT_ERROR: ImportError | None = error

    class UCXError(Exception):
        """Stands in for ucxx's error class when ucxx is absent (never raised)."""
else:
    _IMPORT_ERROR = None

UCX_ERRORS: tuple[type[BaseException], ...] = (UCXError,)
"""What ucxx raises for failed, cancelled or truncated transfers and endpoints."""

UCX_DEFAULTS = {"TCP_TX_SEG_SIZE": "256k", "TCP_RX_SEG_SIZE": "256k"}
"""UCX options applied unless the environment sets them (UCX_TCP_...): bigger TCP segments
move large messages 2-3x faster on loopback and Ethernet; other transports ignore them."""

PROGRESS_MODES = ("thread", "blocking", "polling")
"""How ucxx progresses UCX (``SPARSECOLL_UCX_PROGRESS``, default "thread"): "thread" completes
requests through ucxx's progress and notifier threads; "blocking" progresses on the event loop
when UCX's epoll descriptor fires (on the 2-core VM: 8-byte latency 480 -> 80 us and 1 MiB
allreduce near the TCP transport with 2 ranks, but stalls of tens of ms with 4 ranks on the 2
cores); "polling" spins the loop on UCX (fastest, a core per rank busy)."""
LISTENER_DRAIN_SECONDS = 5.0
ENDPOINT_CLOSE_NS = 2 * 10**9


class _State:
    users = 0
    owned = False
    loop: asyncio.AbstractEventLoop | None = None
    mode = "thread"


def progress_mode() -> str:
    """The progress mode ``SPARSECOLL_UCX_PROGRESS`` asks for (see :data:`PROGRESS_MODES`)."""
    mode = os.environ.get("SPARSECOLL_UCX_PROGRESS", "thread").strip().lower() or "thread"
    if mode not in PROGRESS_MODES:
        raise InvalidArgumentError(f"SPARSECOLL_UCX_PROGRESS={mode!r}: choose from {', '.join(PROGRESS_MODES)}")
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
        try:
            ucxx.init(options=UCX_DEFAULTS, env_takes_precedence=True, progress_mode=mode,
                      enable_python_future=mode == "thread")
        except UCXError:
            ucxx.reset()
            ucxx.init(progress_mode=mode, enable_python_future=mode == "thread")
        _State.owned, _State.loop, _State.mode = True, loop, mode
    _State.users += 1


def release() -> None:
    """Leave the context; the last user shuts it down (and its threads) if we started it."""
    _State.users -= 1
    if _State.users or not _State.owned:
        return
    _State.owned, _State.loop = False, None
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


def cuda_support() -> bool:
    """Whether UCX can move device memory (a CUDA transport is enabled in UCX_TLS)."""
    return bool(ucxx.core._get_ctx().context.cuda_support)


def create_listener(callback: Callable[[Any], Any]) -> Any:
    """A UCX listener on a free port of every interface; ``callback(endpoint)`` per peer."""
    return ucxx.create_listener(callback, port=0, endpoint_error_handling=True)


async def create_endpoint(host: str, port: int, timeout: float) -> Any:
    """Connect to a UCX listener at ``host:port``."""
    return await ucxx.create_endpoint(host, port, endpoint_error_handling=True,
                                      connect_timeout=timeout)


async def close_endpoint(endpoint: Any) -> None:
    """Close ``endpoint`` now; its outstanding transfers are cancelled."""
    if endpoint is None:
        return
    try:
        await endpoint.close(period=ENDPOINT_CLOSE_NS)
    except UCXError as error:
        log.debug("closing a UCX endpoint: %s", error)


async def close_listener(listener: Any) -> None:
    """Close ``listener`` once its accept handlers have returned (ucxx warns otherwise)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LISTENER_DRAIN_SECONDS
    while listener.active_clients and loop.time() < deadline:
        await asyncio.sleep(0.001)
    listener.close()


def is_device(buffer: Any) -> bool:
    """True for CUDA device arrays (cupy, torch CUDA tensors, Numba device arrays)."""
    return hasattr(buffer, "__cuda_array_interface__")


def nbytes(buffer: Any) -> int:
    """Size in bytes of a host or device buffer."""
    if is_device(buffer):
        interface = buffer.__cuda_array_interface__
        count = 1
        for extent in interface["shape"]:
            count *= extent
        return count * int(interface["typestr"][2:])
    return memoryview(buffer).nbytes


def as_message(buffer: Any) -> Any:
    """A buffer as UCX takes it: device arrays untouched, host buffers as flat byte views."""
    if is_device(buffer) or isinstance(buffer, (bytes, bytearray)):
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
    import numpy as np
    from numba import cuda  # only when a device buffer meets an inlined host payload

    cuda.as_cuda_array(sink).copy_to_device(np.frombuffer(data, np.uint8))


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
        failure = await attempt(self.endpoint.recv(buffer))
        if "truncated" in failure.lower():
            raise FrameError(f"handshake message longer than the expected {size} bytes")
        if failure:
            raise ConnectionResetError(f"UCX endpoint failed during the handshake: {failure}")
        return bytes(buffer)

    async def write(self, data: bytes) -> None:
        failure = await attempt(self.endpoint.send(bytearray(data)))
        if failure:
            raise ConnectionResetError(f"UCX endpoint failed during the handshake: {failure}")
