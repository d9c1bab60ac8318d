"""The TCP transport between real processes: strays at the listener, large zero-copy frames."""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np

import sparsecoll
from sparsecoll.wire import FrameHeader, Kind, encode_header
from tests.ranks import run_ranks


async def late_rank_two(rank: int, world: int) -> tuple:
    """Rank 2 joins late, so rank 0's listener is still open while the strays arrive."""
    if rank == 2:
        await asyncio.sleep(2.5)
    async with await sparsecoll.init_group(timeout=30) as group:
        value, _ = await group.allreduce(np.full(100, rank, np.float32))
        rejected = sorted(type(error).__name__ for error in group.transport.rejected)
        return float(value[0]), rejected


def send_strays(processes, store) -> None:
    """Garbage, a huge length field, a truncated header and a silent close, to rank 0."""
    store.wait(["sparsecoll/default/0/addr/0"])
    host, port = store.get("sparsecoll/default/0/addr/0").decode().rsplit(":", 1)
    hello_huge = encode_header(FrameHeader(Kind.HELLO, 0, 0, 0, 1 << 40))
    for payload in (b"\x16\x03\x01 not a frame at all" * 4, hello_huge, hello_huge[:20], b""):
        with socket.create_connection((host, int(port))) as stray:
            stray.sendall(payload)
            time.sleep(0.05)


def test_listener_drops_strays_and_keeps_serving_the_ranks() -> None:
    results = run_ranks(3, late_rank_two, timeout=60, group_kwargs=None, on_started=send_strays)
    for value, _ in results:
        assert value == 3.0
    rejected = results[0][1]
    assert rejected.count("FrameError") >= 3, rejected  # garbage, truncated, silent close
    assert "FrameTooLargeError" in rejected, rejected


async def large_frames(group) -> tuple:
    """64 MiB moved as single frames of 16 MiB segments read straight into the caller's array."""
    data = np.arange(1 << 24, dtype=np.float32) * (group.rank + 1)
    summed, stats = await group.allreduce(data)
    received, _ = await group.broadcast(data if group.rank == 1 else np.empty_like(data), root=1)
    return (bool(np.array_equal(summed, np.arange(1 << 24, dtype=np.float32) * 3)),
            bool(np.array_equal(received, np.arange(1 << 24, dtype=np.float32) * 2)),
            stats.bytes_received)


def test_large_messages_arrive_intact() -> None:
    for summed_ok, broadcast_ok, received in run_ranks(2, large_frames, timeout=120):
        assert summed_ok and broadcast_ok
        assert received >= 4 << 24  # a 2-rank ring receives half the array twice: 64 MiB
