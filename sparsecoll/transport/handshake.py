"""Mutual HMAC-SHA256 challenge-response that opens every connection between two ranks.

The connecting rank sends HELLO (group id, its nonce, its rank); the accepting rank answers
with its nonce and a MAC that proves it holds the secret; the connector checks it and
sends its own MAC (or a refusal); the acceptor checks that and sends its verdict. Both sides
bind the MACs to the group id, both nonces and both ranks, so a proof cannot be replayed
on another connection. A side whose check fails tells the other before closing, so both
raise ``AuthenticationError``; no data frame is accepted before the verdict.

The exchange is written on two small async helpers, ``read(size)`` and ``write(data)``
(:class:`FrameChannel`), so every transport authenticates the same way: a TCP socket is
wrapped in :class:`SocketChannel`, the UCX transport passes its endpoint's channel. Each
``write`` is matched by one ``read`` of the same size, so message-oriented transports
(UCX tag messages) work as well as byte streams.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
import struct
from typing import Protocol

from sparsecoll.errors import AuthenticationError, FrameError, RendezvousError
from sparsecoll.wire import HEADER_SIZE, FrameHeader, Kind, decode_header, encode_header

NONCE_SIZE = 32
MAC_SIZE = 32
GROUP_ID_SIZE = 16
_HELLO = struct.Struct(f"<{GROUP_ID_SIZE}s{NONCE_SIZE}siii")
_CHALLENGE = struct.Struct(f"<{NONCE_SIZE}s{MAC_SIZE}s")
_PROOF = struct.Struct(f"<B{MAC_SIZE}s")
_VERDICT = struct.Struct("<B")


def group_id_for(name: str) -> bytes:
    """The 16-byte identity of a group, derived from its rendezvous key prefix."""
    return hashlib.blake2b(name.encode(), digest_size=GROUP_ID_SIZE).digest()


def _mac(secret: bytes, role: bytes, group_id: bytes, nonce_c: bytes, nonce_a: bytes,
         connector: int, acceptor: int) -> bytes:
    message = role + group_id + nonce_c + nonce_a + struct.pack("<ii", connector, acceptor)
    return hmac.new(secret, message, hashlib.sha256).digest()


class FrameChannel(Protocol):
    """The two operations the handshake needs from a connection."""

    async def read(self, size: int) -> bytes:
        """Exactly ``size`` bytes (one ``write`` of that size on the other side)."""

    async def write(self, data: bytes) -> None:
        """Send ``data`` (read on the other side by one ``read`` of ``len(data)``)."""


class SocketChannel:
    """A non-blocking stream socket as a :class:`FrameChannel` on the running loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def read(self, size: int) -> bytes:
        loop = asyncio.get_running_loop()
        buffer = bytearray(size)
        view = memoryview(buffer)
        filled = 0
        while filled < size:
            received = await loop.sock_recv_into(self.sock, view[filled:])
            if received == 0:
                raise ConnectionResetError("connection closed during the handshake")
            filled += received
        return bytes(buffer)

    async def write(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)


def _channel(connection: socket.socket | FrameChannel) -> FrameChannel:
    return SocketChannel(connection) if isinstance(connection, socket.socket) else connection


async def _read_frame(channel: FrameChannel, kind: Kind, payload_size: int) -> bytes:
    """Read one handshake frame whose kind and exact size are known in advance."""
    header = decode_header(await channel.read(HEADER_SIZE), max_payload=payload_size)
    if header.kind != kind:
        raise FrameError(f"expected a {kind.name} frame, got kind {header.kind}")
    if header.length != payload_size:
        raise FrameError(f"{kind.name} frame of {header.length} bytes, expected {payload_size}")
    return await channel.read(payload_size)


async def _write_frame(channel: FrameChannel, kind: Kind, payload: bytes) -> None:
    """Header and payload as two writes, matching the two reads of ``_read_frame``."""
    await channel.write(encode_header(FrameHeader(kind=kind, context=0, seq=0, tag=0, length=len(payload))))
    await channel.write(payload)


async def connect_handshake(connection: socket.socket | FrameChannel, secret: bytes, group_id: bytes,
                            rank: int, world_size: int, peer: int) -> None:
    """Authenticate an outgoing connection from ``rank`` to ``peer``; raises on failure."""
    channel = _channel(connection)
    nonce_c = os.urandom(NONCE_SIZE)
    await _write_frame(channel, Kind.HELLO, _HELLO.pack(group_id, nonce_c, rank, world_size, peer))
    nonce_a, mac_a = _CHALLENGE.unpack(await _read_frame(channel, Kind.CHALLENGE, _CHALLENGE.size))
    expected = _mac(secret, b"A", group_id, nonce_c, nonce_a, rank, peer)
    accepted = hmac.compare_digest(mac_a, expected)
    proof = _mac(secret, b"C", group_id, nonce_c, nonce_a, rank, peer) if accepted else bytes(MAC_SIZE)
    await _write_frame(channel, Kind.PROOF, _PROOF.pack(int(accepted), proof))
    if not accepted:
        raise AuthenticationError("peer's proof does not match our secret", rank=rank, peer=peer)
    (verdict,) = _VERDICT.unpack(await _read_frame(channel, Kind.VERDICT, _VERDICT.size))
    if verdict != 1:
        raise AuthenticationError("peer rejected our proof: the secrets differ", rank=rank, peer=peer)


async def accept_handshake(connection: socket.socket | FrameChannel, secret: bytes, group_id: bytes,
                           rank: int, world_size: int) -> int:
    """Authenticate an incoming connection and return the peer's rank.

    Errors raised before the HELLO names a valid rank of this group carry no ``peer``: they
    come from strays, which the listener drops while it goes on serving the real ranks.
    """
    channel = _channel(connection)
    hello = await _read_frame(channel, Kind.HELLO, _HELLO.size)
    peer_group, nonce_c, peer, peer_world, target = _HELLO.unpack(hello)
    if peer_group != group_id:
        raise RendezvousError("connection from another group", rank=rank)
    if peer_world != world_size or target != rank or not rank < peer < world_size:
        raise RendezvousError(
            f"HELLO names rank {peer} of {peer_world} for rank {target}; this is rank {rank} "
            f"of {world_size}", rank=rank)
    try:
        return await _prove_to_connector(channel, secret, group_id, rank, peer, nonce_c)
    except (OSError, FrameError) as error:
        raise RendezvousError(f"handshake failed: {error}", rank=rank, peer=peer) from error


async def _prove_to_connector(channel: FrameChannel, secret: bytes, group_id: bytes, rank: int,
                              peer: int, nonce_c: bytes) -> int:
    nonce_a = os.urandom(NONCE_SIZE)
    mac_a = _mac(secret, b"A", group_id, nonce_c, nonce_a, peer, rank)
    await _write_frame(channel, Kind.CHALLENGE, _CHALLENGE.pack(nonce_a, mac_a))
    peer_accepted, mac_c = _PROOF.unpack(await _read_frame(channel, Kind.PROOF, _PROOF.size))
    if not peer_accepted:
        raise AuthenticationError("peer rejected our proof: the secrets differ", rank=rank, peer=peer)
    accepted = hmac.compare_digest(mac_c, _mac(secret, b"C", group_id, nonce_c, nonce_a, peer, rank))
    await _write_frame(channel, Kind.VERDICT, _VERDICT.pack(int(accepted)))
    if not accepted:
        raise AuthenticationError("peer's proof does not match our secret", rank=rank, peer=peer)
    return peer
