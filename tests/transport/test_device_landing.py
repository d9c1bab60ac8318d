"""A device receive buffer in the mailbox: where the transport moves device memory (UCX with a
CUDA transport) the payload lands in the caller's device array itself, with no host copy; a
frame that arrived before its receive, or a receive withdrawn mid-payload, crosses once, counted.

UCX cannot move the fake's memory as device memory here (no GPU, ``UCX_TLS=tcp``), so the
transport's write is played by writing the fake's memory; what is checked is the mailbox's
choice of buffer and the copies it makes.
"""

from __future__ import annotations

import asyncio

import numpy as np

from sparsecoll.transport.device import device_bytes, host_copies, is_device, reset_host_copies
from sparsecoll.transport.mailbox import Mailbox
from sparsecoll.wire import FrameHeader, Kind, Op, Signature, dtype_code
from tests.transport.test_device_buffers import FakeDeviceArray

KEY = (0, 7, 3)  # context, sequence number, tag


def _header(length: int) -> FrameHeader:
    return FrameHeader(Kind.DATA, KEY[0], KEY[1], KEY[2], length)


def _mailbox() -> Mailbox:
    def fail(error: BaseException) -> None:
        raise AssertionError(error)

    return Mailbox(rank=1, max_payload=1 << 20, max_unexpected_bytes=1 << 20, on_failure=fail)


async def _device_receives() -> dict:
    outcome = {}
    payload = np.arange(16, dtype=np.float32)
    mailbox = _mailbox()

    # 1. posted first: the transport writes into the caller's device memory
    target = FakeDeviceArray(np.zeros(16, np.float32))
    reset_host_copies()
    posted = mailbox.post(0, KEY, device_bytes(target))
    landing = mailbox.on_header(0, _header(payload.nbytes))
    outcome["landing_on_device"] = is_device(landing.view)
    landing.view._host[:] = payload.view(np.uint8)  # what UCX's receive does
    landing.filled = payload.nbytes
    mailbox.on_payload(0, _header(payload.nbytes), landing)
    _, received = await posted.future
    outcome["direct"] = (is_device(received), target.peek().tolist(), tuple(host_copies()))

    # 2. the frame came first: it waited in host memory, and is copied to the device once
    early = FakeDeviceArray(np.zeros(16, np.float32))
    reset_host_copies()
    private = mailbox.on_header(0, _header(payload.nbytes))
    private.view[:] = payload.view(np.uint8).tobytes()
    private.filled = payload.nbytes
    mailbox.on_payload(0, _header(payload.nbytes), private)
    _, received = await mailbox.post(0, KEY, device_bytes(early)).future
    outcome["early"] = (is_device(received), early.peek().tolist(), tuple(host_copies()))

    # 3. withdrawn after 8 bytes landed: those move to host memory (one copy), the rest follows there
    withdrawn = FakeDeviceArray(np.zeros(16, np.float32))
    posted = mailbox.post(0, KEY, device_bytes(withdrawn))
    landing = mailbox.on_header(0, _header(payload.nbytes))
    landing.view._host[:8] = payload.view(np.uint8)[:8]
    landing.filled = 8
    reset_host_copies()
    mailbox.cancel(posted)
    outcome["withdrawn"] = (is_device(landing.view), bytes(landing.view[:8]) == payload.view(np.uint8)[:8].tobytes(),
                            tuple(host_copies()))
    return outcome


def test_device_receive_buffers_take_the_payload_without_host_copies() -> None:
    outcome = asyncio.run(_device_receives())
    expected = list(range(16))
    assert outcome["landing_on_device"]
    assert outcome["direct"] == (True, expected, (0, 0, 0))
    assert outcome["early"] == (True, expected, (1, 64, 64))
    assert outcome["withdrawn"] == (False, True, (1, 8, 8))


async def _posted_buffers() -> dict:
    from sparsecoll import p2p
    from sparsecoll.group import Group
    from sparsecoll.transport.tcp import TcpTransport

    def fail(error: BaseException) -> None:
        raise AssertionError(error)

    transport = TcpTransport(0, 2, secret=b"test", group_id=b"landing", on_failure=fail)
    group = Group(0, 2, transport, timeout=5.0, backend="tcp")
    out = FakeDeviceArray(np.zeros(6, np.float64))
    outcome = {}
    for moves_device_memory in (False, True):
        transport.receives_device_memory = lambda: moves_device_memory  # UCX_TLS with or without cuda_copy
        posted = p2p._post(group, 1, 9, out)
        view = posted.out
        outcome[moves_device_memory] = (
            None if view is None else (is_device(view), len(view),
                                       view.__cuda_array_interface__["data"][0] == out.__cuda_array_interface__["data"][0]),
            posted.limit)
        if not moves_device_memory:
            transport.mailbox.cancel(posted)
    # the frame lands in the device buffer (UCX's part, played here) and the receive completes
    # without any host copy
    payload = np.arange(6, dtype=np.float64)
    header = FrameHeader(Kind.DATA, group.context, p2p.P2P_SEQ, 9, payload.nbytes,
                         Signature(Op.P2P, 0, dtype_code(payload.dtype), 0, -1, payload.size))
    landing = transport.mailbox.on_header(1, header)
    landing.view._host[:] = payload.view(np.uint8)
    landing.filled = payload.nbytes
    reset_host_copies()
    transport.mailbox.on_payload(1, header, landing)
    message = await p2p._wait(group, posted, 9, out, None)
    outcome["received"] = (message.value is out, out.peek().tolist(), tuple(host_copies()))
    return outcome


def test_point_to_point_receives_into_device_memory_only_where_the_transport_moves_it() -> None:
    outcome = asyncio.run(_posted_buffers())
    assert outcome[False] == (None, 48)  # TCP: lands in host memory, at most 48 bytes, then copied
    assert outcome[True] == ((True, 48, True), None)  # UCX with CUDA: the caller's own memory, as bytes
    assert outcome["received"] == (True, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], (0, 0, 0))
