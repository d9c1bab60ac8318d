"""A blocking facade over a Group: the event loop runs on a background thread.

Plain training code (and the torch layer) calls ``SyncGroup`` methods like functions; each
call is submitted to the group's loop and waited for. Every public coroutine of
:class:`Group` (dense, sparse, point-to-point, ``split``...) has a blocking twin here with the
same signature, generated from ``Group`` itself so that the two cannot drift apart; sub-groups
come back as ``SyncGroup`` objects on the same loop. Interrupting the waiting thread (Ctrl-C)
aborts the group, so the other ranks raise instead of waiting out their deadline. A blocking
call made on the loop's own thread would wait for itself: it raises
:class:`~sparsecoll.errors.LoopThreadError` instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import numpy as np

from sparsecoll.call import CommStats
from sparsecoll.errors import GroupClosedError, LoopThreadError, SparseCollError
from sparsecoll.group import Group, init_group
from sparsecoll.transport.mailbox import ANY_SOURCE

T = TypeVar("T")

RETURNS_GROUP = ("split",)
"""Coroutines of Group that return a sub-group: their twins return a SyncGroup."""
NOT_MIRRORED = {"run": "SyncGroup.run(coroutine) runs any coroutine of the group; Group.run(signature, body) "
                       "is the hook collectives are written on, so call it as sync.run(sync.group.run(...))"}
"""Public calls of Group whose blocking form differs, and why (the parity test reads this)."""


class SyncGroup:
    """Every call of :class:`Group`, as blocking calls on a background event loop."""

    def __init__(self, group: Group, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.group = group
        self._loop = loop
        self._thread = thread

    @property
    def rank(self) -> int:
        """This rank's number in the group."""
        return self.group.rank

    @property
    def size(self) -> int:
        """Number of ranks in the group."""
        return self.group.size

    @property
    def total_stats(self) -> CommStats:
        """What every call of this group has moved so far, as seen by this rank (running totals)."""
        return self.group.total_stats

    @property
    def closed(self) -> bool:
        """True once the group (or the group it was split from) was closed."""
        return self.group.closed

    @property
    def error(self) -> SparseCollError | None:
        """The failure that poisoned the group, if any."""
        return self.group.error

    def __repr__(self) -> str:
        return f"<SyncGroup {self.group!r}>"

    def __enter__(self) -> SyncGroup:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self.group.abort, f"{type(exc).__name__} on rank {self.rank}")
        self.close()

    def _check_caller(self, what: str) -> None:
        """LoopThreadError when called on the loop's own thread, where waiting would deadlock."""
        if threading.get_ident() == self._thread.ident:
            raise LoopThreadError(f"SyncGroup.{what} was called on the group's own event-loop thread, where "
                                  "it would wait for itself; in a coroutine or codec running there, await the "
                                  "Group call instead (sync_group.group)", rank=self.rank)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run any coroutine of the group (custom collectives too) on its loop and wait.

        Raises :class:`~sparsecoll.errors.LoopThreadError` on the loop's own thread.
        """
        try:
            self._check_caller("run")
        except LoopThreadError:
            coroutine.close()
            raise
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

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future:
        """Start ``coroutine`` on the group's loop without waiting; a concurrent future of its result.

        Coroutines start in submission order. Waiting on the future is the caller's job (every
        collective inside has the group's deadline); :meth:`run` is ``submit`` plus that wait.
        """
        try:
            self._check_caller("submit")
            if not self._loop.is_running():
                raise GroupClosedError("the group's event loop has stopped", rank=self.rank)
        except SparseCollError:
            coroutine.close()
            raise
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _start(self, make_task: Callable[[], Awaitable[T]], what: str) -> concurrent.futures.Future:
        """A concurrent future of a task that ``make_task`` starts on the loop (in call order)."""
        self._check_caller(what)
        if not self._loop.is_running():
            raise GroupClosedError("the group's event loop has stopped", rank=self.rank)

        async def started() -> T:
            return await make_task()

        return asyncio.run_coroutine_threadsafe(started(), self._loop)

    # ----------------------------------------------------------------- calls that differ in form
    def isend(self, array: np.ndarray, dst: int, tag: int = 0, *,
              timeout: float | None = None) -> concurrent.futures.Future:
        """Start :meth:`Group.isend`; returns a :class:`concurrent.futures.Future` of its stats."""
        return self._start(lambda: self.group.isend(array, dst, tag, timeout=timeout), "isend")

    def irecv(self, src: int = ANY_SOURCE, tag: int = 0, *, out: np.ndarray | None = None,
              timeout: float | None = None) -> concurrent.futures.Future:
        """Post :meth:`Group.irecv`; returns a :class:`concurrent.futures.Future` of the
        :class:`~sparsecoll.Message`. Receives are posted in call order."""
        return self._start(lambda: self.group.irecv(src, tag, out=out, timeout=timeout), "irecv")

    def new_group(self, ranks: Sequence[int], name: str | None = None) -> SyncGroup | None:
        """:meth:`Group.new_group` as a SyncGroup on the same loop (None on ranks not listed)."""
        self._check_caller("new_group")
        child = self.group.new_group(ranks, name)
        return None if child is None else SyncGroup(child, self._loop, self._thread)

    def abort(self, reason: str = "") -> None:
        """See :meth:`Group.abort`."""
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self.group.abort, reason)

    def close(self, linger: float = 1.0) -> None:
        """Close the group; the group that owns the loop also stops its thread (idempotent)."""
        if not self._loop.is_running():
            return
        self._check_caller("close")
        if self.group.parent is not None:
            self.run(self.group.close(linger))
            return
        try:
            asyncio.run_coroutine_threadsafe(self.group.close(linger), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()


def _blocking_twin(name: str) -> Callable[..., Any]:
    """SyncGroup's twin of the coroutine ``Group.<name>``: same signature, waits for the result."""
    coroutine_function = getattr(Group, name)
    wraps_group = name in RETURNS_GROUP

    def call(self: SyncGroup, *args: Any, **kwargs: Any) -> Any:
        self._check_caller(name)
        result = self.run(getattr(self.group, name)(*args, **kwargs))
        if wraps_group and result is not None:
            return SyncGroup(result, self._loop, self._thread)
        return result

    signature = inspect.signature(coroutine_function)
    if wraps_group:
        signature = signature.replace(return_annotation="SyncGroup | None")
    call.__name__ = name
    call.__qualname__ = f"SyncGroup.{name}"
    call.__module__ = __name__
    call.__signature__ = signature  # type: ignore[attr-defined]
    call.__annotations__ = dict(coroutine_function.__annotations__, **{"return": signature.return_annotation})
    summary = (inspect.getdoc(coroutine_function) or "").split("\n\n")[0]
    call.__doc__ = f"Blocking :meth:`Group.{name}`: {summary}"
    return call


def group_coroutines() -> list[str]:
    """Names of Group's public coroutine methods, in definition order."""
    return [name for name, member in vars(Group).items()
            if not name.startswith("_") and inspect.iscoroutinefunction(member)]


for _name in group_coroutines():
    if _name not in NOT_MIRRORED and _name not in vars(SyncGroup):
        setattr(SyncGroup, _name, _blocking_twin(_name))


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
