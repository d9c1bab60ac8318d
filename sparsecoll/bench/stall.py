"""A deadline on a benchmark rank's progress: a stall ends the rank with a named message.

Most waits of a training row have their own deadline (the sparsecoll group's, Gloo's), but not
all: DDP's reducer waits on its comm hook's futures with none, and a hook whose allreduces are
queued behind callbacks blocked on Gloo's worker threads (torch's PowerSGD over two buckets)
left every rank idle for good. :class:`StallWatchdog` runs beside the row; when it has not
been told of progress (:meth:`StallWatchdog.beat`) for ``seconds``, it writes what stalled and
every thread's stack to stderr and ends the process with :data:`STALL_EXIT_CODE`, so the
launcher fails the run (``RankCrashed`` with that exit code) instead of waiting.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from types import TracebackType

STALL_EXIT_CODE = 75
"""The exit status of a rank that the watchdog ended (EX_TEMPFAIL)."""


class StallWatchdog:
    """End this process when ``beat`` is not called for ``seconds`` while the watchdog is entered.

    ``what`` names the work in the message (e.g. "row 'PowerSGD r1' on rank 0").
    """

    def __init__(self, seconds: float, what: str) -> None:
        if not seconds > 0:
            raise ValueError(f"a stall deadline must be positive seconds, not {seconds}")
        self.seconds, self.what = seconds, what
        self._last = time.monotonic()
        self._stage = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)

    def beat(self, stage: str) -> None:
        """Progress: the deadline starts again from now; ``stage`` says where the work is."""
        self._last, self._stage = time.monotonic(), stage

    def __enter__(self) -> StallWatchdog:
        self.beat("start")
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.seconds / 4)):
            idle = time.monotonic() - self._last
            if idle > self.seconds:
                sys.stderr.write(f"sparsecoll-bench: {self.what} made no progress for {idle:.0f} s after "
                                 f"{self._stage} (deadline {self.seconds:.0f} s): a wait with no deadline of its "
                                 f"own; ending the rank (exit {STALL_EXIT_CODE}). Stacks:\n")
                sys.stderr.flush()
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                os._exit(STALL_EXIT_CODE)
