"""Communication under backward: a bucket's reduction starts once backward has accumulated its
last gradient, and runs on the group's event loop while backward goes on.

Every bucket reduces on its own *lane*: a sub-group of all ranks (:meth:`Group.new_group`,
created in bucket order on every rank, no traffic) with its own collective sequence numbers.
Which bucket is ready first depends on autograd's schedule and on which parameters got a
gradient, and may differ between ranks; on one shared sequence the ranks' collectives would
then pair different buckets (or a bucket's finite-flag agreement with another's reduction).
On lanes bucket i's collectives pair with bucket i's on every rank, whatever the order of
launch and however many collectives a reduction makes.

A *round* is what one ``step()`` reduces. The :class:`OverlapScheduler`

1. refuses, in a tensor hook that runs before autograd accumulates, a gradient for a bucket
   already launched in this round (a second backward before ``step()`` outside ``no_sync()``):
   the reduction in flight owns the buffer, so the error comes before anything is written;
2. marks a parameter ready in its post-accumulate-grad hook; when the last parameter of a
   bucket is ready, and no ``no_sync()`` is open, it gathers the bucket's gradients and submits
   its reduction to the loop;
3. at the end of that backward (autograd's final callback, as DDP's reducer) launches every
   bucket not launched yet, in index order (a parameter without a gradient on this rank counts
   as zero there, DDP's rule), and waits for all of them: ``backward()`` returns with the mean
   over ranks in ``.grad``, as under DDP, so code between backward and ``step()`` (clipping,
   logging) reads finished gradients and never races a reduction;
4. in :meth:`~OverlapScheduler.finish` (``step()``) does 3 if no backward did (every backward
   inside ``no_sync()``), and agrees with the other ranks on the caller's flags and on the
   number of rounds each has reduced (CollectiveMismatchError on every rank when they differ:
   a rank dropped a round the others stepped);
5. in :meth:`~OverlapScheduler.abandon` (``zero_grad()`` after a backward that reduced, when
   ``step()`` was never called) drops the round's results, after the same agreement: a rank
   that drops a round its peers step meets their step's agreement with its own, and every rank
   raises CollectiveMismatchError at once.

Every wait is a collective's wait, so it has the group's deadline: a rank that never launches
a bucket makes the others raise CollectiveTimeoutError, not hang.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from sparsecoll.call import CommStats
from sparsecoll.collectives.auto import shared_cost_model
from sparsecoll.errors import CollectiveMismatchError, InvalidArgumentError, NonFiniteGradientError
from sparsecoll.group import Group
from sparsecoll.sync import SyncGroup
from sparsecoll.torch.buckets import Bucket
from sparsecoll.torch.device_launch import Launch, capture
from sparsecoll.torch.exchange import all_finite, any_rank_flags, reduce_buffer

Reduction = Callable[[Bucket, Group], Coroutine[Any, Any, Any]]
"""Makes the coroutine that reduces one bucket on its lane (the optimizer's)."""


def wait_all(sync: SyncGroup, futures: Sequence[concurrent.futures.Future]) -> list[Any]:
    """Every future's result, after all of them are done; then the first failure is raised.

    Interrupting the wait (Ctrl-C) aborts the group, as :meth:`SyncGroup.run` does, so the
    other ranks raise instead of waiting out their deadline.
    """
    results: list[Any] = []
    failure: BaseException | None = None
    for future in futures:
        try:
            results.append(future.result())
        except BaseException as error:
            if not future.done():  # interrupted while waiting, not a failure of the reduction
                sync.abort(f"{type(error).__name__} while waiting for a bucket's reduction")
                raise
            results.append(None)
            failure = failure or error
    if failure is not None:
        raise failure
    return results


AGREED_FLAGS = 4
"""Flags the round's agreement carries (the caller's, padded), so that a step's agreement and a
dropped round's have the same shape and pair with each other."""


async def _agree(group: Group, flags: Sequence[bool], rounds: int, stepping: bool) -> tuple[bool, ...]:
    """The flags OR-ed over the ranks, in one allreduce that also carries the rounds reduced so
    far and whether this rank steps or drops the round: CollectiveMismatchError on every rank
    when ranks differ in either (a rank dropped a round that the others step)."""
    if len(flags) > AGREED_FLAGS:
        raise ValueError(f"at most {AGREED_FLAGS} flags, got {len(flags)}")
    padded = [*(1.0 if flag else 0.0 for flag in flags), *[0.0] * (AGREED_FLAGS - len(flags))]
    kind = 1.0 if stepping else 0.0
    values = np.array([*padded, rounds, -rounds, kind, -kind], np.float64)
    total, _ = await group.allreduce(values, op="max")
    most, fewest = int(total[AGREED_FLAGS]), -int(total[AGREED_FLAGS + 1])
    mixed = total[AGREED_FLAGS + 2] != -total[AGREED_FLAGS + 3]
    if most != fewest or mixed:
        error = CollectiveMismatchError(
            f"ranks disagree on this step's gradient reduction (this rank {'steps' if stepping else 'drops'} its "
            f"round {rounds}; rounds on the ranks: {fewest} to {most}{'; some step, some drop it' if mixed else ''}): "
            "a rank dropped a step the others took, e.g. an exception between backward() and step() on some ranks "
            "only, then zero_grad(); with overlap the reductions were already shared, so every rank must step or "
            "drop alike", rank=group.rank)
        group.poison(error)  # the lanes in flight fail at once on every rank, instead of at their deadline
        raise error
    return tuple(bool(value > 0) for value in total[:len(flags)])


class _Ready:
    """Post-accumulate-grad hook: the parameter at ``position`` of bucket ``index`` is ready.
    It holds its scheduler weakly: a dropped optimizer's hooks must not launch anything."""

    __slots__ = ("scheduler", "index", "position")

    def __init__(self, scheduler: OverlapScheduler, index: int, position: int) -> None:
        self.scheduler = weakref.ref(scheduler)
        self.index = index
        self.position = position

    def __call__(self, param: torch.Tensor) -> None:
        scheduler = self.scheduler()
        if scheduler is not None:
            scheduler._ready(self.index, self.position)


class _Guard:
    """Tensor hook, run before autograd accumulates: refuse a gradient for a launched bucket."""

    __slots__ = ("scheduler", "index")

    def __init__(self, scheduler: OverlapScheduler, index: int) -> None:
        self.scheduler = weakref.ref(scheduler)
        self.index = index

    def __call__(self, grad: torch.Tensor) -> None:
        scheduler = self.scheduler()
        if scheduler is not None:
            scheduler._check_open(self.index)


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()


class OverlapScheduler:
    """Launches each bucket's reduction, on its lane, as soon as backward has produced it.

    ``reduction(bucket, lane)`` makes the coroutine that reduces ``bucket`` on ``lane``; its
    results come back from :meth:`finish` in bucket order. Hooks launch only while
    :attr:`active`; before that (and with it off) nothing changes for backward. A bound method
    is held weakly (no cycle keeps its optimizer alive), and the hooks go when the scheduler does.
    """

    def __init__(self, sync: SyncGroup, reduction: Reduction) -> None:
        self.sync = sync
        self._reduction = weakref.WeakMethod(reduction) if hasattr(reduction, "__self__") else lambda: reduction
        self.active = False
        """Whether backward launches reductions (the optimizer turns it on after its first step)."""
        self.rounds = 0
        """Rounds reduced (stepped or abandoned) since the scheduler was built."""
        self.launched_by_backward = 0
        """Reductions a backward hook launched (the others were launched by ``step()``)."""
        self.buckets: list[Bucket] = []
        self.lanes: list[Group] = []
        self._missing: list[set[int]] = []
        self._futures: list[concurrent.futures.Future | None] = []
        self._accumulating = 0
        self._callback_queued = False
        self._lock = threading.Lock()
        self._handles: list = []
        weakref.finalize(self, _remove, self._handles)

    # ----------------------------------------------------------------------- set-up
    def add(self, buckets: Sequence[Bucket]) -> None:
        """Give ``buckets`` lanes and hooks; every rank adds the same buckets in the same order."""
        for bucket in buckets:
            if bucket.index != len(self.buckets):
                raise ValueError(f"buckets are added in index order: expected {len(self.buckets)}, got {bucket.index}")
            self.buckets.append(bucket)
            self.lanes.append(self.sync.group.new_group(range(self.sync.size), f"bucket-{bucket.index}"))
            self._missing.append(set(range(len(bucket.params))))
            self._futures.append(None)
            for position, param in enumerate(bucket.params):
                self._handles.append(param.register_hook(_Guard(self, bucket.index)))
                self._handles.append(param.register_post_accumulate_grad_hook(_Ready(self, bucket.index, position)))

    # ----------------------------------------------------------------------- the round
    @property
    def launched(self) -> bool:
        """Whether this round has launched any reduction yet (done or still in flight)."""
        return any(future is not None for future in self._futures)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate; the first backward outside launches."""
        if self.launched:
            raise InvalidArgumentError("no_sync() was entered after a backward that already launched this "
                                       "step's reductions: accumulate inside no_sync() first, then run the last "
                                       "backward outside it, then step()", rank=self.sync.rank)
        with self._lock:
            self._accumulating += 1
        try:
            yield
        finally:
            with self._lock:
                self._accumulating -= 1

    def _check_open(self, index: int) -> None:
        if self._futures[index] is not None:
            raise InvalidArgumentError(
                f"a gradient arrived for bucket {index}, whose reduction this step already launched: a second "
                "backward before step(). Run all but the last backward inside optimizer.no_sync() to accumulate "
                "gradients; or call zero_grad() to drop this step's gradients (it waits for the reductions in "
                "flight first)", rank=self.sync.rank)

    def _ready(self, index: int, position: int) -> None:
        if not self.active or self._accumulating:
            return
        with self._lock:
            if not self._callback_queued:
                self._callback_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            missing = self._missing[index]
            missing.discard(position)
            if missing or self._futures[index] is not None:
                return
            self.launched_by_backward += 1
            self._launch(index)

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        self._launch_remaining()
        wait_all(self.sync, [future for future in self._futures if future is not None])
        for bucket in self.buckets:  # a parameter without a gradient here gets the mean too, as under DDP
            bucket.scatter_grads()

    def _launch(self, index: int) -> None:
        bucket = self.buckets[index]
        bucket.gather_grads()
        self._futures[index] = self.sync.submit(self._reduction()(bucket, self.lanes[index], capture(bucket.flat)))

    def _launch_remaining(self) -> None:
        with self._lock:
            for index, future in enumerate(self._futures):
                if future is None:
                    self._launch(index)

    def finish(self, flags: Sequence[bool] = ()) -> tuple[list[Any], tuple[bool, ...]]:
        """End the round: launch what backward did not, agree on ``flags`` (OR over the ranks)
        and on the round count, and wait for every reduction. Returns the reductions' results in
        bucket order and the agreed flags. The buckets are free again however it ends."""
        return self._agree_and_drain(flags, stepping=True)

    def abandon(self) -> None:
        """Drop a round that launched reductions but will not be stepped (see the module notes):
        every rank must drop it alike, which the same agreement checks."""
        if self.launched:
            self._agree_and_drain((), stepping=False)

    def _agree_and_drain(self, flags: Sequence[bool], stepping: bool) -> tuple[list[Any], tuple[bool, ...]]:
        self._launch_remaining()
        try:
            agreed = self.sync.run(_agree(self.sync.group, list(flags), self.rounds, stepping))
        except BaseException:
            try:  # the reductions in flight write into the buckets: let them end first
                self._drain()
            except Exception:  # noqa: S110  (the group failed: the agreement's error is the one to see)
                pass
            raise
        return self._drain(), agreed

    def _drain(self) -> list[Any]:
        futures = [future for future in self._futures if future is not None]
        try:
            return wait_all(self.sync, futures)
        finally:
            if all(future.done() for future in futures):
                self._reset()

    def _reset(self) -> None:
        with self._lock:
            self.rounds += 1
            self._futures = [None] * len(self.buckets)
            self._missing = [set(range(len(bucket.params))) for bucket in self.buckets]


def resolve_overlap(overlap: bool, *, clip_norm: float | None, grad_scaler: Any, density_schedule: Any = None) -> bool:
    """``overlap``, or ValueError where it cannot be exact: local clipping scales every bucket by
    the norm of all of them, a GradScaler's scale and overflow flags come only with ``step()``,
    and a density schedule decides the step's density from every bucket's gradient; all need
    every gradient before the first bucket leaves."""
    reasons = [reason for reason, present in (("clip_norm (the norm covers every bucket)", clip_norm is not None),
                                               ("grad_scaler (AMP's scale is known only in step())",
                                                grad_scaler is not None),
                                               ("a density schedule (it reads every bucket first)",
                                                density_schedule is not None)) if present]
    if overlap and reasons:
        raise ValueError(f"overlap=True cannot be exact with {' and '.join(reasons)}: every bucket must be in "
                         "before the first is reduced; use overlap=False")
    return bool(overlap)


class OverlappedSteps:
    """The overlapped half of :class:`~sparsecoll.torch.SparseCollOptimizer`'s step (a mixin: it
    uses the optimizer's buckets, memories, compression and helpers)."""

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Gradient accumulation, as DDP's ``no_sync()``: backward passes inside only accumulate;
        the first backward outside launches the reductions of the sum, and ``step()`` applies it.
        Without overlap, backward never communicates, and this changes nothing."""
        return contextlib.nullcontext() if self._scheduler is None else self._scheduler.no_sync()

    @property
    def overlapping(self) -> bool:
        """Whether backward launches reductions now (overlap, from the second step on)."""
        return self._scheduler is not None and self._scheduler.active

    def _start_overlap(self) -> None:
        """After the first step, let backward launch the reductions, unless a GradScaler drove it
        (its scale and overflow flags come only with step()). "auto" shares rank 0's cost model
        with every lane here, on every rank alike."""
        if self._scheduler is None or self._scheduler.active or getattr(self, "grad_scale", None) is not None:
            return
        if self.compression.algorithm == "auto":
            shared = self.sync.run(shared_cost_model(self.sync.group))
            for lane in self._scheduler.lanes:
                self.sync.run(shared_cost_model(lane, shared))
        self._scheduler.active = True

    def _overlapped_step(self, stray: str) -> None:
        """Wait for the reductions backward launched (and launch the rest), then step: see
        :mod:`sparsecoll.torch.overlap`. A bucket with NaN/inf on any rank was not reduced."""
        amp = getattr(self, "grad_scale", None) is not None
        results, (strayed, amp_anywhere) = self._scheduler.finish([bool(stray), amp])
        if strayed:
            raise self._stray_error(stray)
        if amp_anywhere:
            raise InvalidArgumentError("a GradScaler stepped this optimizer after backward had already reduced the "
                                       "scaled gradients: build the SparseCollOptimizer with overlap=False (a "
                                       "scaler that drives the first step keeps overlap off)", rank=self.sync.rank)
        if any(stats is None for stats in results):
            if not self.skip_nonfinite:
                raise NonFiniteGradientError(
                    f"a gradient held NaN or inf at step {self.steps} (on this rank or another); its bucket was not "
                    "reduced and keeps its residual, the buckets reduced before it was known have spent theirs "
                    "(overlap); the group and optimizer stay usable", rank=self.sync.rank)
            self.skipped_steps += 1
            return
        self.last_stats = CommStats()
        for stats in results:
            self.last_stats += stats
        self._apply()

    async def _reduce_on_lane(self, bucket: Bucket, lane: Group, launch: Launch | None = None) -> CommStats | None:
        """One bucket's reduction under overlap: agree that it is finite on every rank (else
        None, residual untouched), fold weight decay and momentum in, reduce (CUDA work on
        ``launch``, the launching thread's device and stream)."""
        if await any_rank_flags(lane, not all_finite(bucket.gradient)):
            return None
        momentum, nesterov = self._momentum_of(bucket)
        compression = self.compression
        return await reduce_buffer(lane, bucket.flat, self.memories[bucket.index], compression,
                                   density=self.density_now(), step=self.steps,
                                   seed=compression.seed + 1000003 * bucket.index, compressed=bucket.compressed,
                                   momentum=momentum, nesterov=nesterov, lazy=self.lazy_states[bucket.index],
                                   algorithm_state=self.algorithm_states[bucket.index], launch=launch,
                                   source=bucket.source)

