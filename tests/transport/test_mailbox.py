"""The mailbox's ownership rules, driven frame by frame the way a transport drives it."""

from __future__ import annotations

import asyncio
import gc

from sparsecoll.errors import PeerLostError
from sparsecoll.transport.mailbox import ANY_SOURCE, Mailbox
from sparsecoll.wire import FrameHeader, Kind

KEY = (0, 7, 3)


def _mailbox(failures: list) -> Mailbox:
    return Mailbox(rank=0, max_payload=1 << 20, max_unexpected_bytes=1 << 22, on_failure=failures.append)


def _header(length: int) -> FrameHeader:
    return FrameHeader(Kind.DATA, KEY[0], KEY[1], KEY[2], length)


def _stream(landing, data: bytes, start: int, end: int) -> None:
    """What a transport does with each chunk that arrives: write at ``filled``, advance."""
    landing.view[start:end] = data[start:end]
    landing.filled = end


async def test_a_header_claims_its_any_source_receive_so_two_senders_never_share_out() -> None:
    failures: list = []
    mailbox = _mailbox(failures)
    outs = [bytearray(8), bytearray(8)]
    first = mailbox.post(ANY_SOURCE, KEY, memoryview(outs[0]))
    second = mailbox.post(ANY_SOURCE, KEY, memoryview(outs[1]))
    from_one, from_two = b"\x01" * 8, b"\x02" * 8
    landing_one = mailbox.on_header(1, _header(8))
    landing_two = mailbox.on_header(2, _header(8))  # rank 2's header arrives mid-payload
    _stream(landing_one, from_one, 0, 4)
    _stream(landing_two, from_two, 0, 8)
    mailbox.on_payload(2, _header(8), landing_two)
    _stream(landing_one, from_one, 4, 8)
    mailbox.on_payload(1, _header(8), landing_one)
    (_, payload_one), (_, payload_two) = first.future.result(), second.future.result()
    assert (first.source, bytes(payload_one)) == (1, from_one)
    assert (second.source, bytes(payload_two)) == (2, from_two)
    assert outs == [bytearray(from_one), bytearray(from_two)] and failures == []


async def test_a_withdrawn_receive_gets_nothing_more_and_the_message_is_kept_intact() -> None:
    mailbox = _mailbox([])
    out = bytearray(16)
    message = bytes(range(16))
    posted = mailbox.post(1, KEY, memoryview(out))
    landing = mailbox.on_header(1, _header(16))
    _stream(landing, message, 0, 6)
    await mailbox.release(posted)  # cancelled mid-payload
    out[:] = b"\xff" * 16  # the caller scribbles on its buffer at once
    _stream(landing, message, 6, 16)
    mailbox.on_payload(1, _header(16), landing)
    assert out == b"\xff" * 16
    later = mailbox.post(1, KEY)
    assert bytes(later.future.result()[1]) == message


async def test_failing_receives_that_nobody_awaits_logs_nothing() -> None:
    loop = asyncio.get_running_loop()
    reported: list = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context["message"]))
    mailbox = _mailbox([])
    for tag in range(3):  # receives an algorithm posted for later segments
        mailbox.post(1, (0, 7, tag))
    mailbox.post(2, KEY, memoryview(bytearray(8)))
    mailbox.on_header(2, _header(8))
    mailbox.peer_closed(2, PeerLostError("gone", rank=0, peer=2))
    mailbox.fail(PeerLostError("lost", rank=0, peer=1))
    gc.collect()
    await asyncio.sleep(0)
    assert reported == []
