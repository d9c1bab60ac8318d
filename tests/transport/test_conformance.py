"""What every transport must do with the caller's buffers and deadlines, run over TCP and UCX
(in the spirit of trio's ``check_two_way_stream``): real ranks, real connections.

One spawn of ranks per backend runs every scenario; the tests read its outcomes.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from sparsecoll.errors import CollectiveTimeoutError, SparseCollError
from sparsecoll.p2p import P2P_SEQ
from tests.ranks import run_ranks

SENDERS = 3
SIZES = (1 << 10, 1 << 18, 1 << 21)
"""Message sizes in bytes: small (inlined or one read), and large enough to stream."""

def random_schedules(count: int, seed: int) -> list[tuple[list[tuple[int, int]], int]]:
    """Per schedule: the (tag, size) messages each sender sends in turn (1 to 4, tags 0 and 1,
    sizes from SIZES), and a seed that shuffles the order rank 0 posts its ANY_SOURCE receives
    in. Drawn from a fixed seed: one spawn runs them all, so a failure names its schedule."""
    rng = np.random.default_rng(seed)
    return [([(int(rng.integers(2)), int(rng.choice(SIZES))) for _ in range(int(rng.integers(1, 5)))],
             int(rng.integers(2**16))) for _ in range(count)]


SCHEDULES = [([(0, SIZES[2]), (1, SIZES[1]), (0, SIZES[2])], 1),   # large frames of one tag: streamed
             ([(0, SIZES[2])] * 4, 3),                              # all alike: only the claim tells them apart
             ([(1, SIZES[0]), (1, SIZES[2])], 2),
             *random_schedules(8, seed=2026)]


async def any_source_into_out(group, schedules: list) -> list[str]:
    """Every sender sends the same messages (filled with its rank and index) at once; rank 0
    takes them all with ANY_SOURCE receives into ``out=`` buffers."""
    problems = []
    for example, (messages, seed) in enumerate(schedules):
        await group.barrier()
        tags = [example * 2 + tag for tag, _ in messages]
        if group.rank:
            sends = [group.isend(np.full(size // 4, group.rank * 100 + index, np.int32), 0, tags[index])
                     for index, (_tag, size) in enumerate(messages)]
            await asyncio.gather(*sends)
            continue
        order = [index for index in range(len(messages)) for _ in range(SENDERS)]
        np.random.default_rng(seed).shuffle(order)
        outs = [np.full(max(SIZES) // 4, -1, np.int32) for _ in order]
        receives = [group.irecv(tag=tags[index], out=out) for index, out in zip(order, outs)]
        seen = {}
        for index, receive in zip(order, receives):
            message = await receive
            values = np.unique(message.value)
            expected = message.source * 100
            if values.size != 1 or not 0 <= values[0] - expected < len(messages):
                problems.append(f"example {example}: rank {message.source} tag {message.tag}: {values[:4]}")
                continue
            seen.setdefault((message.source, message.tag), []).append(int(values[0]) - expected)
        for key, indices in seen.items():  # per (source, tag), in the order sent
            if indices != sorted(indices):
                problems.append(f"example {example}: {key} out of order: {indices}")
        if sum(map(len, seen.values())) != SENDERS * len(messages) and not problems:
            problems.append(f"example {example}: {seen}")
    return problems


def test_any_source_receives_into_out_never_mix_senders(backend: str) -> None:
    for outcome in _scenarios(backend):
        assert outcome["any source"] == []


BIG = 32 << 20
STALL = 4.0
SHORT, LONG = 1.5, 4.0


def _caught_mid_payload(posted) -> bool:
    landing = posted.landing
    return landing is not None and (landing.in_flight is not None or 0 < landing.filled < len(landing.view))


def posted_receive(group, src: int, tag: int):
    """The mailbox's entry for the one point-to-point receive posted for (src, tag)."""
    (posted,) = group.transport.mailbox._posted[(group.members[src], (group.context, P2P_SEQ, tag))]
    return posted


async def until_streaming(posted) -> bool:
    """Wait, a loop turn at a time, until ``posted``'s payload is part-way in (True) or the
    receive is over (False): an event, not a guess at how long a transfer takes. For a frame
    larger than a socket's buffers hold, it takes at least two reads, and this runs between."""
    while not posted.future.done() and not _caught_mid_payload(posted):
        await asyncio.sleep(0)
    return not posted.future.done()


async def cancels_mid_payload(group) -> dict:
    """Rank 1 sends two large messages; rank 0 withdraws its receive of the first mid-payload
    and scribbles on ``out``. Then rank 1 cancels a large send mid-payload and scribbles on
    its buffer; whatever rank 0 receives then is the original."""
    mailbox, outcome = group.transport.mailbox, {}
    first = np.arange(BIG // 4, dtype=np.int32)
    second = first[::-1].copy()
    if group.rank > 1:
        await group.barrier()
        await group.barrier()
        return outcome
    if group.rank == 1:
        await group.barrier()  # rank 0 has posted its receive
        await group.send(first, 0, tag=1)
        await group.send(second, 0, tag=1)
        await group.barrier()
        buffer = np.full(2 * BIG // 4, 7, np.int32)
        sending = group.isend(buffer, 0, tag=2)
        await asyncio.sleep(0.005)
        outcome["cancelled mid-send"] = not sending.done()
        sending.cancel()
        try:
            await sending
            outcome["send"] = "completed"
        except asyncio.CancelledError:
            outcome["send"] = "cancelled"
        except SparseCollError as error:
            outcome["send"] = type(error).__name__
        buffer[:] = -1  # the caller owns its buffer again
        return outcome
    out = np.zeros(BIG // 4, np.int32)
    posted = mailbox.post(1, (group.context, P2P_SEQ, 1), memoryview(out).cast("B"))
    await group.barrier()
    outcome["caught mid-payload"] = await until_streaming(posted)
    await mailbox.release(posted)
    out[:] = -1
    message = await group.recv(1, tag=1)
    outcome["first intact"] = np.array_equal(message.value, first)
    message = await group.recv(1, tag=1)
    outcome["second intact"] = np.array_equal(message.value, second)
    outcome["out untouched"] = bool((out == -1).all())
    await group.barrier()
    try:
        message = await group.recv(1, tag=2, timeout=20)
        outcome["cancelled send"] = "intact" if (message.value == 7).all() else "corrupted"
    except SparseCollError as error:
        outcome["cancelled send"] = type(error).__name__
    return outcome


async def stalled(group, short_deadline_rank: int) -> tuple:
    """Rank 2 stops serving its connections (a blocked event loop) while the others run a
    large ring allreduce: rank 1's send to rank 2 stalls mid-frame, rank 3 waits on rank 2,
    rank 0 on rank 3. ``short_deadline_rank``'s deadline fires first."""
    await group.barrier()
    if group.rank == 2:
        time.sleep(STALL)
    timeout = SHORT if group.rank == short_deadline_rank else LONG
    try:
        await group.allreduce(np.ones(16 << 20, np.float32), timeout=timeout)
        return "no error", None, "", {}
    except SparseCollError as error:
        if group.rank != 2:
            await asyncio.sleep(STALL)  # stay connected until rank 2 reads the abort
        return type(error).__name__, error.peer, str(error), dict(group.transport.waits)


async def scenarios(rank: int, world: int, schedules: list) -> dict:
    """Each scenario on a fresh group of the same ranks: one spawn for all of them."""
    import sparsecoll

    outcome = {}
    for name, body, args in (("any source", any_source_into_out, (schedules,)),
                             ("cancels", cancels_mid_payload, ()),
                             ("deadline mid-frame", stalled, (1,)),
                             ("blame chain", stalled, (0,))):
        async with await sparsecoll.init_group(name=name.replace(" ", "-"), timeout=30) as group:
            outcome[name] = await body(group, *args)
    return outcome


_OUTCOMES: dict[str, list] = {}


def _scenarios(backend: str) -> list[dict]:
    """Every rank's outcomes of every scenario, run once per backend."""
    if backend not in _OUTCOMES:
        _OUTCOMES[backend] = run_ranks(1 + SENDERS, scenarios, SCHEDULES, timeout=200, group_kwargs=None)
    return _OUTCOMES[backend]


def test_withdrawn_buffers_are_the_callers_again(backend: str) -> None:
    receiver, sender = (outcome["cancels"] for outcome in _scenarios(backend)[:2])
    assert receiver["caught mid-payload"], receiver
    assert receiver["first intact"] and receiver["second intact"] and receiver["out untouched"], receiver
    # the frame either went out whole (UCX finishes it) or the group was aborted (TCP)
    assert receiver["cancelled send"] in ("intact", "GroupAbortedError", "PeerLostError"), receiver
    assert sender["cancelled mid-send"] and sender["send"] == "cancelled", sender


def test_a_deadline_mid_frame_reaches_every_rank_as_a_timeout(backend: str) -> None:
    results = [outcome["deadline mid-frame"] for outcome in _scenarios(backend)]
    assert [result[:2] for result in results] == [("CollectiveTimeoutError", 2)] * 4, results


def test_every_survivor_names_the_stalled_rank(backend: str) -> None:
    results = [outcome["blame chain"] for outcome in _scenarios(backend)]
    assert [result[:2] for result in results] == [("CollectiveTimeoutError", 2)] * 4, results
