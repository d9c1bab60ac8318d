"""Point-to-point messages between two ranks of a group, matched by (source, tag).

Messages from one source with one tag arrive in the order they were sent, as in MPI.
A receive may name its source or take ``ANY_SOURCE``. Point-to-point frames carry their
group's context and a reserved sequence number, so they never mix with collectives or with
another group's messages.

Cancellation and failure rules:

* a receive that is cancelled or times out is withdrawn and the group stays usable; its
  ``out`` is the caller's again the moment the call raises (a payload that was streaming
  into it is finished in private memory), and the message waits for the next matching
  receive;
* a send that is cancelled or times out before its frame started leaves the group usable;
  one cut off after part of its frame reached the wire cannot be resynchronized, so the
  group is poisoned: with ``GroupAbortedError`` for a cancellation, with the
  ``CollectiveTimeoutError`` itself for a deadline. Either way the send buffer is the
  caller's again when the call raises (UCX: once UCX has finished the frame, or after
  ``SEND_RELEASE_GRACE`` seconds by closing the connection);
* a lost peer poisons the group, as for collectives.

Device arrays (``__cuda_array_interface__``) are sent as they are: UCX moves them, TCP stages
them through host memory (see :mod:`sparsecoll.transport.device`); a device ``out`` receives
the payload straight into its memory where the transport moves device memory (UCX with a CUDA
transport), else through host memory and a counted copy. Their sizes and dtypes come from the interface,
and a non-contiguous one is refused before anything is sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from sparsecoll.arrays import as_sendable, is_device_array
from sparsecoll.call import CommStats
from sparsecoll.errors import CollectiveTimeoutError, FrameError, InvalidArgumentError, SparseCollError
from sparsecoll.transport.device import copy_from_host, device_bytes, device_dtype, device_nbytes, is_device, is_writeable
from sparsecoll.transport.mailbox import ANY_SOURCE
from sparsecoll.wire import HEADER_SIZE, FrameHeader, Kind, Op, Signature, dtype_code, dtype_from_code

if TYPE_CHECKING:
    from sparsecoll.group import Group

P2P_SEQ = (1 << 64) - 1
"""Sequence number reserved for point-to-point frames (collectives count up from 0)."""
MAX_TAG = (1 << 32) - 1


class Message(NamedTuple):
    """A received message: its array, the rank that sent it, and its tag."""

    value: np.ndarray
    source: int
    tag: int


def _check_tag(group: Group, tag: int) -> None:
    if not 0 <= tag <= MAX_TAG:
        raise InvalidArgumentError(f"tag must be in [0, {MAX_TAG}], got {tag}", rank=group.rank)


def _check_peer(group: Group, peer: int, role: str, allow_any: bool = False) -> None:
    if allow_any and peer == ANY_SOURCE:
        return
    if not 0 <= peer < group.size or peer == group.rank:
        raise InvalidArgumentError(f"{role} {peer} is not another rank of a group of {group.size}",
                                   rank=group.rank)


async def send(group: Group, array: Any, dst: int, tag: int = 0, *,
               timeout: float | None = None) -> CommStats:
    """Send ``array`` to rank ``dst``; returns (or raises, a cancellation included) once the
    buffer may be reused. Cancelling it follows the rules of this module's docstring."""
    group.check_usable()
    _check_peer(group, dst, "destination")
    _check_tag(group, tag)
    data, dtype, nbytes = _sendable(group, array)
    signature = Signature(Op.P2P, 0, dtype_code(dtype), 0, -1, nbytes // dtype.itemsize)
    header = FrameHeader(Kind.DATA, group.context, P2P_SEQ, tag, nbytes, signature)
    seconds = group.timeout if timeout is None else timeout
    loop = asyncio.get_running_loop()
    started = loop.time()
    await group.transport.send(
        group.members[dst], header, [data], deadline=started + seconds,
        timeout_error=lambda: CollectiveTimeoutError(
            f"send of {nbytes} bytes (tag {tag}) to rank {dst} took more than {seconds:.3g} s",
            rank=group.rank, peer=dst))
    return CommStats(bytes_sent=HEADER_SIZE + nbytes, frames_sent=1, rounds=1,
                     seconds=loop.time() - started)


def _sendable(group: Group, array: Any) -> tuple[Any, np.dtype, int]:
    """(what goes to the transport, its dtype, its bytes): a device array as it is (the
    transport moves it, or stages it through host memory), a host one as a C-contiguous
    numpy array."""
    if not is_device_array(array):
        data = as_sendable(array, group.rank)
        return data, data.dtype, data.nbytes
    try:
        dtype, nbytes = device_dtype(array), device_nbytes(array)
        dtype_code(dtype)
    except InvalidArgumentError as error:
        raise InvalidArgumentError(error.message, rank=group.rank) from None
    except FrameError:
        raise InvalidArgumentError(f"dtype {dtype} is not supported", rank=group.rank) from None
    return array, dtype, nbytes


def _post(group: Group, src: int, tag: int, out: Any):
    group.check_usable()
    _check_peer(group, src, "source", allow_any=True)
    _check_tag(group, tag)
    view, limit = None, None
    if out is not None and is_device_array(out):
        try:
            limit = device_nbytes(out)  # lands in host memory, then copied into ``out`` (TCP)
        except InvalidArgumentError as error:
            raise InvalidArgumentError(f"out: {error.message}", rank=group.rank) from None
        if not is_writeable(out):
            raise InvalidArgumentError("out is a read-only device array", rank=group.rank)
        if group.transport.receives_device_memory():
            view, limit = device_bytes(out), None  # the transport writes into ``out`` itself
    elif out is not None:
        if not isinstance(out, np.ndarray) or not out.flags.c_contiguous or not out.flags.writeable:
            raise InvalidArgumentError("out must be a writeable C-contiguous numpy or device array",
                                       rank=group.rank)
        view = memoryview(out.reshape(-1)).cast("B")
    peer = src if src == ANY_SOURCE else group.members[src]
    return group.transport.mailbox.post(peer, (group.context, P2P_SEQ, tag), view, limit=limit)


async def _wait(group: Group, posted, tag: int, out: np.ndarray | None,
                timeout: float | None) -> Message:
    seconds = group.timeout if timeout is None else timeout
    try:
        async with asyncio.timeout(seconds):
            header, payload = await posted.future
    except SparseCollError:
        await group.transport.mailbox.release(posted)
        raise
    except TimeoutError:
        await group.transport.mailbox.release(posted)
        who = "any rank" if posted.peer == ANY_SOURCE else f"rank {group.members.index(posted.peer)}"
        raise CollectiveTimeoutError(f"no message with tag {tag} from {who} within {seconds:.3g} s",
                                     rank=group.rank,
                                     peer=None if posted.peer == ANY_SOURCE else posted.peer) from None
    except asyncio.CancelledError:
        await group.transport.mailbox.release(posted)
        raise
    source = group.members.index(posted.source)
    dtype = dtype_from_code(header.signature.dtype) or np.dtype(np.uint8)
    if out is None:
        return Message(np.frombuffer(payload, dtype), source, tag)
    on_device = is_device_array(out)
    out_dtype = device_dtype(out) if on_device else out.dtype
    if dtype != out_dtype:
        raise InvalidArgumentError(f"rank {source} sent {dtype}, the receive buffer is {out_dtype}",
                                   rank=group.rank, peer=posted.source)
    count = header.length // dtype.itemsize
    size = device_nbytes(out) // dtype.itemsize if on_device else out.size
    value = out if count == size else out.reshape(-1)[:count]
    if on_device and not is_device(payload):  # landed in host memory (TCP, or before the receive)
        copy_from_host(np.frombuffer(payload, dtype), value)
    return Message(value, source, tag)


async def recv(group: Group, src: int = ANY_SOURCE, tag: int = 0, *, out: np.ndarray | None = None,
               timeout: float | None = None) -> Message:
    """Receive the next message with ``tag`` from ``src`` (or any rank).

    With ``out`` the payload lands in it directly (it may be larger than the message; the
    value is then the filled prefix); without it a new 1-D array of the sent dtype is returned.
    Cancelling it, or its deadline passing, withdraws the receive and leaves the group usable.
    """
    return await _wait(group, _post(group, src, tag, out), tag, out, timeout)


def irecv(group: Group, src: int = ANY_SOURCE, tag: int = 0, *, out: np.ndarray | None = None,
          timeout: float | None = None) -> asyncio.Task:
    """Post a receive now (so matching follows call order) and return its task; cancelling
    the task withdraws the receive (the group stays usable)."""
    posted = _post(group, src, tag, out)
    return asyncio.ensure_future(_wait(group, posted, tag, out, timeout))


def isend(group: Group, array: Any, dst: int, tag: int = 0, *,
          timeout: float | None = None) -> asyncio.Task:
    """Start a send and return its task; sends to one peer leave in call order. Cancelling
    the task follows :func:`send`'s rule."""
    return asyncio.ensure_future(send(group, array, dst, tag, timeout=timeout))


async def wait_all(handles: Iterable[asyncio.Future]) -> list[Any]:
    """Wait for every handle; if one fails, cancel the rest and raise its error."""
    handles = list(handles)
    try:
        return list(await asyncio.gather(*handles))
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise
