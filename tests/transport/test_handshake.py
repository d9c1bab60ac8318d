"""HMAC challenge-response between two real sockets in one process."""

from __future__ import annotations

import asyncio
import socket

import pytest

from sparsecoll.errors import AuthenticationError, FrameError, RendezvousError
from sparsecoll.transport.handshake import accept_handshake, connect_handshake, group_id_for

GROUP = group_id_for("sparsecoll/test/0")


async def _pair(connector_secret: bytes, acceptor_secret: bytes, connector_group: bytes = GROUP):
    left, right = socket.socketpair()
    left.setblocking(False)
    right.setblocking(False)

    async def accept():
        try:
            return await accept_handshake(right, acceptor_secret, GROUP, rank=0, world_size=2)
        finally:
            right.close()  # as the listener does, so a waiting connector sees the end

    try:
        return await asyncio.wait_for(asyncio.gather(
            connect_handshake(left, connector_secret, connector_group, rank=1, world_size=2, peer=0),
            accept(), return_exceptions=True), 10)
    finally:
        left.close()
        right.close()


async def test_matching_secrets_authenticate_both_sides() -> None:
    connected, peer = await _pair(b"secret", b"secret")
    assert connected is None and peer == 1


async def test_wrong_secret_fails_on_both_sides() -> None:
    connector, acceptor = await _pair(b"wrong", b"secret")
    assert isinstance(connector, AuthenticationError) and connector.peer == 0
    assert isinstance(acceptor, AuthenticationError) and acceptor.peer == 1


async def test_connection_from_another_group_is_a_stray() -> None:
    connector, acceptor = await _pair(b"secret", b"secret", group_id_for("another/job"))
    assert isinstance(acceptor, RendezvousError) and acceptor.peer is None
    assert isinstance(connector, (ConnectionError, FrameError, RendezvousError, OSError))


async def test_garbage_instead_of_hello_is_a_frame_error() -> None:
    left, right = socket.socketpair()
    right.setblocking(False)
    left.sendall(b"GET / HTTP/1.1\r\n" * 8)
    with pytest.raises(FrameError):
        await accept_handshake(right, b"secret", GROUP, rank=0, world_size=2)
    left.close()
    right.close()
