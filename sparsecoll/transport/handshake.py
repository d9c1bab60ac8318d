"""Mutual HMAC-SHA256 challenge-response that opens every connection between two ranks.

The connecting rank sends HELLO (group id, its nonce, its rank); the accepting rank answers
with its nonce and a MAC that proves it holds the secret; the connector checks it and
sends its own MAC (or a refusal); the acceptor checks that and sends its verdict. Both sides
bind the MACs to the group id, both nonces and both ranks, so a proof cannot be replayed
on another connection. A side whose check fails tells the other before closing, so both
raise ``AuthenticationError``; no data frame is accepted before the verdict.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
import struct

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


async def _read_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    buffer = bytearray(size)
    view = memoryview(buffer)
    filled = 0
    while filled < size:
        received = await loop.sock_recv_into(sock, view[filled:])
        if received == 0:
            raise ConnectionResetError("connection closed during the handshake")
        filled += received
    return bytes(buffer)


async def _read_frame(sock: socket.socket, kind: Kind, payload_size: int) -> bytes:
    """Read one handshake frame whose kind and exact size are known in advance."""
    header = decode_header(await _read_exactly(sock, HEADER_SIZE), max_payload=payload_size)
    if header.kind != kind:
        raise FrameError(f"expected a {kind.name} frame, got kind {header.kind}")
    if header.length != payload_size:
        raise FrameError(f"{kind.name} frame of {header.length} bytes, expected {payload_size}")
    return await _read_exactly(sock, payload_size)


async def _write_frame(sock: socket.socket, kind: Kind, payload: bytes) -> None:
    header = encode_header(FrameHeader(kind=kind, context=0, seq=0, tag=0, length=len(payload)))
    await asyncio.get_running_loop().sock_sendall(sock, header + payload)


async def connect_handshake(sock: socket.socket, secret: bytes, group_id: bytes, rank: int,
                            world_size: int, peer: int) -> None:
    """Authenticate an outgoing connection from ``rank`` to ``peer``; raises on failure."""
    nonce_c = os.urandom(NONCE_SIZE)
    await _write_frame(sock, Kind.HELLO, _HELLO.pack(group_id, nonce_c, rank, world_size, peer))
    nonce_a, mac_a = _CHALLENGE.unpack(await _read_frame(sock, Kind.CHALLENGE, _CHALLENGE.size))
    expected = _mac(secret, b"A", group_id, nonce_c, nonce_a, rank, peer)
    accepted = hmac.compare_digest(mac_a, expected)
    proof = _mac(secret, b"C", group_id, nonce_c, nonce_a, rank, peer) if accepted else bytes(MAC_SIZE)
    await _write_frame(sock, Kind.PROOF, _PROOF.pack(int(accepted), proof))
    if not accepted:
        raise AuthenticationError("peer's proof does not match our secret", rank=rank, peer=peer)
    (verdict,) = _VERDICT.unpack(await _read_frame(sock, Kind.VERDICT, _VERDICT.size))
    if verdict != 1:
        raise AuthenticationError("peer rejected our proof: the secrets differ", rank=rank, peer=peer)


async def accept_handshake(sock: socket.socket, secret: bytes, group_id: bytes, rank: int,
                           world_size: int) -> int:
    """Authenticate an incoming connection and return the peer's rank.

    Errors raised before the HELLO names a valid rank of this group carry no ``peer``: they
    come from strays, which the listener drops while it goes on serving the real ranks.
    """
    hello = await _read_frame(sock, Kind.HELLO, _HELLO.size)
    peer_group, nonce_c, peer, peer_world, target = _HELLO.unpack(hello)
    if peer_group != group_id:
        raise RendezvousError("connection from another group", rank=rank)
    if peer_world != world_size or target != rank or not rank < peer < world_size:
        raise RendezvousError(
            f"HELLO names rank {peer} of {peer_world} for rank {target}; this is rank {rank} "
            f"of {world_size}", rank=rank)
    try:
        return await _prove_to_connector(sock, secret, group_id, rank, peer, nonce_c)
    except (OSError, FrameError) as error:
        raise RendezvousError(f"handshake failed: {error}", rank=rank, peer=peer) from error


async def _prove_to_connector(sock: socket.socket, secret: bytes, group_id: bytes, rank: int,
                              peer: int, nonce_c: bytes) -> int:
    nonce_a = os.urandom(NONCE_SIZE)
    mac_a = _mac(secret, b"A", group_id, nonce_c, nonce_a, peer, rank)
    await _write_frame(sock, Kind.CHALLENGE, _CHALLENGE.pack(nonce_a, mac_a))
    peer_accepted, mac_c = _PROOF.unpack(await _read_frame(sock, Kind.PROOF, _PROOF.size))
    if not peer_accepted:
        raise AuthenticationError("peer rejected our proof: the secrets differ", rank=rank, peer=peer)
    accepted = hmac.compare_digest(mac_c, _mac(secret, b"C", group_id, nonce_c, nonce_a, peer, rank))
    await _write_frame(sock, Kind.VERDICT, _VERDICT.pack(int(accepted)))
    if not accepted:
        raise AuthenticationError("peer's proof does not match our secret", rank=rank, peer=peer)
    return peer
