"""A blocking facade over a Group: the event loop runs on a background thread.

Plain training code (and the torch layer) calls ``SyncGroup`` methods like functions; each
call is submitted to the group's loop and waited for. Interrupting the waiting thread
(Ctrl-C) aborts the group, so the other ranks raise instead of waiting out their deadline.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np

from sparsecoll.call import CollectiveResult
from sparsecoll.errors import GroupClosedError
from sparsecoll.group import Group, init_group

T = TypeVar("T")


class SyncGroup:
    """The same collectives as :class:`Group`, as blocking calls."""

    def __init__(self, group: Group, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.group = group
        self._loop = loop
        self._thread = thread

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def size(self) -> int:
        return self.group.size

    def __repr__(self) -> str:
        return f"<SyncGroup {self.group!r}>"

    def __enter__(self) -> SyncGroup:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self.group.abort, f"{type(exc).__name__} on rank {self.rank}")
        self.close()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run any coroutine of the group (custom collectives too) on its loop and wait."""
        if not self._loop.is_running():
            coroutine.close()
            raise GroupClosedError("the group's event loop has stopped", rank=self.rank)
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException as error:
            if not future.done():
                self._loop.call_soon_threadsafe(self.group.abort, f"{type(error).__name__} while waiting")
                future.cancel()
            raise

    def allreduce(self, array: np.ndarray, op: str = "sum", *, out: np.ndarray | None = None,
                  timeout: float | None = None) -> CollectiveResult:
        """See :meth:`Group.allreduce`."""
        return self.run(self.group.allreduce(array, op, out=out, timeout=timeout))

    def allgather(self, array: np.ndarray, *, out: np.ndarray | None = None,
                  timeout: float | None = None) -> CollectiveResult:
        """See :meth:`Group.allgather`."""
        return self.run(self.group.allgather(array, out=out, timeout=timeout))

    def allgatherv(self, array: np.ndarray, *, counts: list[int] | None = None,
                   timeout: float | None = None) -> CollectiveResult:
        """See :meth:`Group.allgatherv`."""
        return self.run(self.group.allgatherv(array, counts=counts, timeout=timeout))

    def broadcast(self, array: np.ndarray, root: int = 0, *, out: np.ndarray | None = None,
                  timeout: float | None = None) -> CollectiveResult:
        """See :meth:`Group.broadcast`."""
        return self.run(self.group.broadcast(array, root, out=out, timeout=timeout))

    def barrier(self, *, timeout: float | None = None) -> CollectiveResult:
        """See :meth:`Group.barrier`."""
        return self.run(self.group.barrier(timeout=timeout))

    def abort(self, reason: str = "") -> None:
        """See :meth:`Group.abort`."""
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self.group.abort, reason)

    def close(self) -> None:
        """Close the group and stop its loop thread (idempotent)."""
        if not self._loop.is_running():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.group.close(), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()


def init_sync_group(**kwargs: Any) -> SyncGroup:
    """Create a group (same arguments as :func:`sparsecoll.init_group`) with a blocking API."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="sparsecoll-loop", daemon=True)
    thread.start()
    try:
        group = asyncio.run_coroutine_threadsafe(init_group(**kwargs), loop).result()
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        raise
    return SyncGroup(group, loop, thread)
