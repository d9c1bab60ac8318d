"""The stall watchdog of ``sparsecoll-bench train``'s ranks: a wait with no deadline of its own
(here an event nobody sets, as DDP's reducer waiting on a hook's future) becomes a named
failure of that rank within the watchdog's deadline, while a rank that keeps beating finishes."""

from __future__ import annotations

import threading
import time

import pytest

from sparsecoll.bench.stall import STALL_EXIT_CODE, StallWatchdog
from tests.ranks import RankCrashed, run_ranks

DEADLINE = 1.0


def stalling_rank(rank: int, world: int) -> str:
    with StallWatchdog(DEADLINE, f"rank {rank}, row 'PowerSGD r1',") as watchdog:
        for step in range(15):  # longer than the deadline in all: each beat must restart it
            time.sleep(DEADLINE / 10)
            watchdog.beat(f"step {step + 1}")
        if rank == 0:
            threading.Event().wait()  # never set: only the watchdog ends this
    return "finished"


def test_a_rank_that_stops_making_progress_ends_with_a_named_message(capfd: pytest.CaptureFixture) -> None:
    started = time.monotonic()
    with pytest.raises(RankCrashed, match=rf"ranks \[0\] died without a result \(exit codes \[{STALL_EXIT_CODE}\]\)"):
        run_ranks(2, stalling_rank, timeout=60, group_kwargs=None)
    assert time.monotonic() - started < 30  # the watchdog's deadline, not the launcher's 60 s
    stderr = capfd.readouterr().err
    assert "rank 0, row 'PowerSGD r1', made no progress for" in stderr and "after step 15" in stderr
    assert "rank 1," not in stderr  # the rank that went on beating finished
    assert "stalling_rank" in stderr  # every thread's stack, the stalled wait among them


def test_a_deadline_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        StallWatchdog(0, "row")
