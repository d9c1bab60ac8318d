"""The UCX transport between real processes: zero-copy receives, lifetime, strays, GPU buffers.

The collective and fault suites run over UCX too (the ``backend`` fixture); these are the
things only UCX has. Ranks use UCX over loopback TCP unless UCX_TLS is set.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import threading
import time

import numpy as np
import pytest

import sparsecoll
from sparsecoll.errors import SparseCollError
from sparsecoll.transport.ucx_runtime import ENDPOINT_CLOSE_SECONDS
from sparsecoll.wire import FrameHeader, Kind, encode_header
from tests.conftest import ucx_required, ucx_unavailable
from tests.ranks import run_ranks
from tests.test_group import DEADLINE, killed_mid_collective

pytestmark = [pytest.mark.ucx,  # the backend fixture fails instead when SPARSECOLL_REQUIRE_UCX=1
              pytest.mark.skipif(bool(ucx_unavailable()) and not ucx_required(), reason=ucx_unavailable() or "-"),
              pytest.mark.parametrize("backend", ["ucx"], indirect=True)]

CONTEXT = 9  # a context no group uses, so these frames never meet a collective
BIG = 64 << 20


def data_header(seq: int, length: int) -> FrameHeader:
    return FrameHeader(Kind.DATA, CONTEXT, seq, 0, length)


def posted_into(group, peer: int, seq: int, out) -> object:
    view = out if hasattr(out, "__cuda_array_interface__") else memoryview(out).cast("B")
    return group.transport.mailbox.post(peer, (CONTEXT, seq, 0), view)


async def zero_copy_receives(group) -> dict:
    """Rank 0 posts arrays, then asks rank 1 for 64 MiB, a 3-buffer frame and a tiny frame."""
    if group.rank == 0:
        big = np.zeros(BIG // 4, np.float32)
        parts = np.zeros(3 + BIG // 8, np.int64)
        tiny = np.zeros(5, np.int32)
        big.fill(0), parts.fill(0)  # touch the pages, so peak RSS counts only what UCX adds
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        posted = [posted_into(group, 1, 1, big), posted_into(group, 1, 2, parts), posted_into(group, 1, 3, tiny)]
        started = time.perf_counter()
        await group.barrier()
        payloads = [(await p.future)[1] for p in posted]
        seconds = time.perf_counter() - started
        growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
        return {"big": bool(np.array_equal(big, np.arange(BIG // 4, dtype=np.float32))),
                "parts": bool(np.array_equal(parts, np.arange(3 + BIG // 8, dtype=np.int64))),
                "tiny": tiny.tolist(),
                "into_posted": [payload.obj is array for payload, array in zip(payloads, (big, parts, tiny))],
                "rss_growth_mib": growth_kib / 1024, "seconds": seconds,
                "unexpected_bytes": group.transport.mailbox._unexpected_bytes}
    await group.barrier()
    big = np.arange(BIG // 4, dtype=np.float32)
    whole = np.arange(3 + BIG // 8, dtype=np.int64)
    pieces = [whole[:1], whole[1:3], whole[3:]]
    await group.transport.send(0, data_header(1, big.nbytes), [big])
    await group.transport.send(0, data_header(2, whole.nbytes), pieces)
    await group.transport.send(0, data_header(3, 20), [np.arange(5, dtype=np.int32)])
    return {}


def test_large_host_buffers_land_in_posted_arrays(backend: str) -> None:
    result, sender = run_ranks(2, zero_copy_receives, timeout=120)
    assert sender == {}, sender  # the sending rank's error, returned as a value, fails the test
    assert result["big"] and result["parts"] and result["tiny"] == [0, 1, 2, 3, 4], result
    assert result["unexpected_bytes"] == 0 and result["into_posted"] == [True] * 3, result
    # no staging buffer: 96 MiB arrived, the peak grew by far less (UCX's own buffers only)
    assert result["rss_growth_mib"] < 32, result


def ucx_state() -> dict:
    import ucxx

    names = [thread.name for thread in threading.enumerate()]
    return {"context": ucxx.core._ctx is not None, "notifier": any("Notifier" in n for n in names)}


LINGER = 0.01
CLOSE_BUDGET = 3 * ENDPOINT_CLOSE_SECONDS + 1.0 + 3 * LINGER
"""The longest a close may take by its own deadlines: the payload endpoint's flush and close
and the connection endpoint's close, each given up after ENDPOINT_CLOSE_SECONDS, the reader's
1 s (UcxConnection.release), and the lingers for strays, BYE and EOF."""


async def close_mid_transfer(rank: int, world: int) -> dict:
    """Both ranks close while 256 MiB is on its way from rank 1 into rank 0's posted array."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("ucx").addHandler(handler)
    group = await sparsecoll.init_group(timeout=30)
    array = np.zeros(BIG, np.float32)
    if rank == 0:
        posted = posted_into(group, 1, 1, array)
        await group.barrier()
        await asyncio.sleep(0.01)
    else:
        array += 1
        await group.barrier()
        sending = asyncio.ensure_future(group.transport.send(0, data_header(1, array.nbytes), [array]))
        await asyncio.sleep(0.01)
    started = time.monotonic()
    transport = group.transport
    await group.close(linger=LINGER)  # too short for 256 MiB: endpoints close mid-transfer
    closed_in = time.monotonic() - started
    if rank == 1:
        try:
            await asyncio.wait_for(sending, 5)
            outcome = "sent"
        except SparseCollError as error:
            outcome = type(error).__name__
    elif not posted.future.done():
        outcome = "pending"
    elif posted.future.exception() is not None:
        outcome = type(posted.future.exception()).__name__
    else:
        outcome = "arrived whole" if bool((array == 1).all()) else "arrived damaged"
    return {"closed_in": closed_in, "outcome": outcome, "endpoints": transport.open_endpoints,
            "payload_endpoints": transport.payload_endpoints, "warnings": records, **ucx_state()}


@pytest.mark.parametrize("tls", ["tcp", "sm,tcp"])
def test_close_while_a_transfer_is_in_flight(backend: str, tls: str) -> None:
    results = run_ranks(2, close_mid_transfer, timeout=90, group_kwargs=None, env={"UCX_TLS": tls})
    for result in results:
        assert result["closed_in"] < CLOSE_BUDGET, results  # within its deadlines: no hang on the transfer
        assert result["endpoints"] == 0 and not result["context"] and not result["notifier"], results
        assert result["warnings"] == [], results
        assert result["payload_endpoints"] == (tls != "tcp"), results
    assert results[1]["outcome"] in ("sent", "PeerLostError", "GroupClosedError"), results
    # the receiver's own close or the sender's closing first, whichever it sees first; shared
    # memory may be quick enough to deliver it all first, but never only part of it
    assert results[0]["outcome"] in ("GroupClosedError", "PeerLostError", "arrived whole"), results


CLOSE_LINGER = 1.0
"""Group.close's default linger: the longest a close waits for the peer's BYE."""
PEER_AWAY = (CLOSE_LINGER + ENDPOINT_CLOSE_SECONDS) / 2
"""Seconds each rank blocks its loop after its close (as a blocking store wait would): longer
than a close may linger for its peer's BYE, shorter than a payload flush it would give up on."""


async def groups_whose_peer_moves_on(rank: int, world: int) -> list[tuple[float, float]]:
    """Groups in turn over shared memory; rank 0 closes each once rank 1's BYE says it is
    closing, and after its close each rank blocks its loop for PEER_AWAY, so it no longer
    progresses UCX while the other may still be closing. Returns, per group, when this rank's
    close returned and when it woke up, on the host's monotonic clock (CLOCK_MONOTONIC, one
    clock for every process)."""
    moments = []
    for index in range(6):
        group = await sparsecoll.init_group(name=f"moves-on{index}", timeout=20)
        await group.allreduce(np.ones(1 << 18, np.float32))
        if rank == 0:
            peer = group.transport._connections[1]
            while not peer.bye_received:
                await asyncio.sleep(0.001)
        await group.close(linger=CLOSE_LINGER)
        closed_at = time.monotonic()
        time.sleep(PEER_AWAY)
        moments.append((closed_at, time.monotonic()))
    return moments


def test_a_close_does_not_wait_for_a_peer_that_has_moved_on(backend: str) -> None:
    """A payload endpoint's flush needs the peer: it is closed while the peer is still closing.
    A close that flushed after its peer had moved on would return only once the flush is given
    up (ENDPOINT_CLOSE_SECONDS) or the peer progresses again, after it wakes: so each rank's
    close must return before the other rank wakes from its PEER_AWAY."""
    results = run_ranks(2, groups_whose_peer_moves_on, timeout=120, group_kwargs=None,
                        env={"UCX_TLS": "sm,tcp"})
    assert all(isinstance(result, list) for result in results), results  # a returned error fails
    late = [(index, rank, round(closed_at - woke_at, 3))
            for index, rounds in enumerate(zip(*results))
            for rank, ((closed_at, _), (_, woke_at)) in enumerate((rounds, rounds[::-1]))
            if closed_at >= woke_at]
    assert not late, f"a close returned after its peer woke (group, rank, seconds after): {late}"


async def groups_one_after_another(rank: int, world: int) -> list:
    """Five groups in turn, some failing: nothing of UCX may outlive any of them."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("ucx").addHandler(handler)
    states = []
    for index in range(5):
        group = await sparsecoll.init_group(name=f"round{index}", timeout=20)
        total = None
        try:
            value, _ = await group.allreduce(np.full(1000, rank, np.float32))
            total = float(value[0])
            if index % 2:
                group.abort("odd round")  # may reach a peer still inside its allreduce
            await group.barrier()
        except SparseCollError:
            pass
        await group.close()
        states.append((index, total, group.transport.open_endpoints, ucx_state()))
    return [states, records]


def test_no_endpoint_listener_or_thread_outlives_a_group(backend: str) -> None:
    for states, warnings in run_ranks(3, groups_one_after_another, timeout=120, group_kwargs=None):
        assert warnings == [], warnings
        for index, total, endpoints, state in states:
            assert total == 3.0 or index % 2 and total is None, states
            assert endpoints == 0
            assert state == {"context": False, "notifier": False}, states


async def strays_then_join(rank: int, world: int) -> tuple:
    """Rank 2 first pokes rank 0's UCX listener with strays, then joins the group."""
    if rank == 2:
        await _send_strays()
    async with await sparsecoll.init_group(timeout=30) as group:
        value, _ = await group.allreduce(np.full(100, rank, np.float32))
        return float(value[0]), sorted(type(error).__name__ for error in group.transport.rejected)


async def _send_strays() -> None:
    import ucxx
    from torch.distributed import TCPStore

    from sparsecoll.transport.handshake import _HELLO, group_id_for

    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), None, False)
    store.wait(["sparsecoll/default/0/addr/0"])
    host, port = store.get("sparsecoll/default/0/addr/0").decode().rsplit(":", 1)
    with socket.create_connection((host, int(port))) as raw:  # not UCX at all
        raw.sendall(b"\x16\x03\x01 not a frame" * 8)
    other_group = _HELLO.pack(group_id_for("another/job"), bytes(32), 1, 3, 0)
    hello = encode_header(FrameHeader(Kind.HELLO, 0, 0, 0, len(other_group)))
    for messages in ([hello, other_group], [b"G" * 100], []):
        endpoint = await ucxx.create_endpoint(host, int(port))
        for message in messages:
            await endpoint.send(bytearray(message))
        await asyncio.sleep(0.2)
        await endpoint.close()
    ucxx.reset()


def test_listener_drops_strays_and_keeps_serving_the_ranks(backend: str) -> None:
    results = run_ranks(3, strays_then_join, timeout=90, group_kwargs=None)
    assert [value for value, _ in results] == [3.0] * 3, results
    rejected = results[0][1]
    assert "RendezvousError" in rejected and "FrameError" in rejected, rejected


def _cuda_devices() -> int:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


async def device_buffers(group) -> dict:
    """64 MiB of cupy memory each way, handed to UCX as device pointers on both ends."""
    import cupy

    peer = 1 - group.rank
    source = cupy.arange(BIG // 4, dtype=cupy.float32) * (group.rank + 1)
    target = cupy.zeros(BIG // 4, cupy.float32)
    posted = posted_into(group, peer, 1, target.view(cupy.uint8))
    await group.barrier()
    started = time.perf_counter()
    await group.transport.send(peer, data_header(1, source.nbytes), [source])
    await posted.future
    seconds = time.perf_counter() - started
    expected = cupy.arange(BIG // 4, dtype=cupy.float32) * (peer + 1)
    return {"equal": bool((target == expected).all()), "gbps": source.nbytes / seconds / 1e9}


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_devices() == 0, reason="needs cupy and a CUDA device")
def test_device_buffers_move_without_staging(backend: str) -> None:
    env = {"UCX_TLS": os.environ.get("SPARSECOLL_TEST_GPU_TLS", "tcp,cuda_copy,cuda_ipc")}
    for result in run_ranks(2, device_buffers, timeout=120, env=env):
        assert result["equal"], result


async def collectives_then_close(rank: int, world: int) -> dict:
    """A small and a 1 MiB allreduce, a point-to-point round trip, then a clean close."""
    async with await sparsecoll.init_group(timeout=30) as group:
        small, _ = await group.allreduce(np.full(4, rank + 1, np.float32))
        large, _ = await group.allreduce(np.full(1 << 18, rank + 1, np.float32))
        peer = 1 - rank
        reply = asyncio.ensure_future(group.recv(peer, tag=5))
        await group.send(np.arange(10, dtype=np.int64) * (rank + 1), peer, tag=5)
        message = await reply
        transport = group.transport
        import ucxx

        transports = ucxx.get_config()["TLS"]
    return {"small": small.tolist(), "large": float(large[0]), "message": message.value.tolist(),
            "endpoints": transport.open_endpoints, "payload_endpoints": transport.payload_endpoints,
            "transports": transports, **ucx_state()}


@pytest.mark.parametrize("mode", ["thread", "blocking", "polling"])
def test_other_progress_modes_run_collectives_and_close_cleanly(backend: str, mode: str) -> None:
    results = run_ranks(2, collectives_then_close, timeout=90, group_kwargs=None,
                        env={"SPARSECOLL_UCX_PROGRESS": mode})
    for rank, result in enumerate(results):
        assert result["small"] == [3.0] * 4 and result["large"] == 3.0, result
        assert result["message"] == (np.arange(10) * (2 - rank)).tolist(), result
        assert result["endpoints"] == 0 and not result["context"] and not result["notifier"], result


@pytest.mark.parametrize("tls, mode, setting, expected, transports", [
    ("sm,tcp", "event", None, 1, "posix,sysv,tcp"), ("sm,tcp", "thread", "1", 1, "posix,sysv,tcp"),
    ("tcp", "event", "1", 0, "tcp"), ("sm,tcp", "event", "0", 0, "sm,tcp")])
def test_local_ranks_move_payloads_through_shared_memory_unless_turned_off_or_ucx_tls_forbids(
        backend: str, tls: str, mode: str, setting: str | None, expected: int, transports: str) -> None:
    """UCX uses no shared memory on an endpoint with peer-failure handling: a second one carries
    payloads, and the context leaves out the transports that read the peer's memory (cma)."""
    env = {"UCX_TLS": tls, "SPARSECOLL_UCX_PROGRESS": mode}
    if setting is not None:
        env["SPARSECOLL_UCX_SHARED_MEMORY"] = setting
    results = run_ranks(2, collectives_then_close, timeout=90, group_kwargs=None, env=env)
    for rank, result in enumerate(results):
        assert result["payload_endpoints"] == expected and result["transports"] == transports, result
        assert result["small"] == [3.0] * 4 and result["large"] == 3.0, result
        assert result["message"] == (np.arange(10) * (2 - rank)).tolist(), result
        assert result["endpoints"] == 0 and not result["context"], result


def test_a_killed_peer_is_noticed_while_its_payloads_come_through_shared_memory(backend: str) -> None:
    results = run_ranks(4, killed_mid_collective, timeout=60, expect_dead={2}, env={"UCX_TLS": "sm,tcp"})
    for rank in (0, 1, 3):
        name, peer, seconds = results[rank]
        assert (name, peer) == ("PeerLostError", 2), results[rank]
        assert seconds < DEADLINE, results[rank]  # noticed as a loss, before the survivors' deadline


PAYLOAD_WAIT = 20.0


async def killed_mid_payload(group) -> tuple:
    """Rank 1 SIGKILLs itself while 256 MiB is on its way through shared memory into rank 0."""
    array = np.zeros(BIG, np.float32)
    if group.rank == 0:
        posted = posted_into(group, 1, 1, array)
        await group.barrier()
        started = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(posted.future), PAYLOAD_WAIT)
        except SparseCollError as error:
            return type(error).__name__, error.peer, time.monotonic() - started, group.transport.payload_endpoints
        return "arrived", None, time.monotonic() - started, group.transport.payload_endpoints
    await group.barrier()
    asyncio.ensure_future(group.transport.send(0, data_header(1, array.nbytes), [array]))
    await asyncio.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_peer_killed_mid_payload_is_an_error_not_an_abort(backend: str) -> None:
    """With cma, UCX aborted the receiver here in 4 of 4 runs (a copy out of a dead process)."""
    for _ in range(2):
        name, peer, seconds, payload_endpoints = run_ranks(2, killed_mid_payload, timeout=60, expect_dead={1},
                                                           env={"UCX_TLS": "sm,tcp"})[0]
        assert (name, peer, payload_endpoints) == ("PeerLostError", 1, 1), (name, peer, payload_endpoints)
        assert seconds < PAYLOAD_WAIT / 2, seconds  # an error well before the receiver gives up


async def init_with_progress_mode(rank: int, world: int) -> str:
    try:
        async with await sparsecoll.init_group(timeout=10):
            return "created"
    except SparseCollError as error:
        return f"{type(error).__name__}: {error}"


def test_an_unknown_progress_mode_is_refused(backend: str) -> None:
    for outcome in run_ranks(2, init_with_progress_mode, timeout=60, group_kwargs=None,
                             env={"SPARSECOLL_UCX_PROGRESS": "turbo"}):
        assert outcome.startswith("InvalidArgumentError") and "turbo" in outcome, outcome
