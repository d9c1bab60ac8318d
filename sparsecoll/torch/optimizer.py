"""SparseCollOptimizer: wrap any torch optimizer so that gradients travel compressed.

On ``step()`` the wrapper

1. brings every gradient into its bucket (a missing gradient counts as zero, as in DDP);
2. under AMP, unscales; if any rank's gradient holds inf/NaN, skips the step on every rank
   (residuals and momentum untouched, counted in ``skipped_steps``), or with
   ``skip_nonfinite=False`` raises NonFiniteGradientError on every rank;
3. clips locally (DGC), folds SGD weight decay in and applies momentum correction;
4. reduces every bucket with the chosen collective, keeping what was not sent (error feedback);
5. writes the mean over ranks into ``.grad`` and calls the wrapped optimizer.

With ``overlap=True`` (from the second step on) 2-4 happen per bucket, each bucket's reduction
starting as soon as backward has produced it and ending before backward returns (see
:mod:`sparsecoll.torch.overlap`).

Its state is rank-local: save it per rank (see :meth:`SparseCollOptimizer.state_dict`).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from sparsecoll.call import CommStats
from sparsecoll.collectives.auto import shared_cost_model
from sparsecoll.collectives.lazy import LazyState
from sparsecoll.collectives.reduce import BUILTIN, LAZY_REFUSED
from sparsecoll.sync import SyncGroup
from sparsecoll.torch.buckets import DEFAULT_BUCKET_BYTES, Bucket, build_buckets, layout_signature, small_parameters
from sparsecoll.torch.density import DensitySchedule
from sparsecoll.torch.device_launch import Launch, capture
from sparsecoll.torch.error_feedback import ErrorFeedback, clip_factor, warmup_density
from sparsecoll.torch.exchange import Compression, any_rank_flags, check_layout, reduce_buffer, with_hierarchical
from sparsecoll.torch.overlap import OverlappedSteps, OverlapScheduler, resolve_overlap
from sparsecoll.torch.replicas import broadcast_tensors, replicated_tensors
from sparsecoll.torch.sparse_update import apply_sgd, sparse_sgd_applies
from sparsecoll.torch.step_flags import StepFlags

_TAKEN_OVER = ("momentum", "weight_decay", "nesterov")
_HOOK_TABLES = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                "_optimizer_load_state_dict_post_hooks")
"""The hook tables torch's ``Optimizer.register_*_hook`` methods fill (set up by its ``__init__``,
which the wrapper cannot call: its param_groups, state and defaults are the wrapped optimizer's)."""
LAZY_ALGORITHMS = (*(name for name in BUILTIN if name not in LAZY_REFUSED), "auto")
"""What ``lazy=`` works with: the builtins reduce_gradient does not refuse it for, and "auto"."""


class _Prepared(NamedTuple):
    """A step's exchange inputs taken on the calling thread (see ``_prepare_exchange``)."""

    launches: list[Launch | None]
    clip_scale: float


class SparseCollOptimizer(OverlappedSteps, StepFlags, torch.optim.Optimizer):
    """A torch optimizer whose gradients are summed over a sparsecoll group, compressed.

    ``algorithm`` is "dense", "allgather" (sparse top-k allgather: each rank's top-k pairs
    allgathered and summed), "gtopk", "sketch", "cltk", a registered collective
    or a registered compressor (its payloads are allgathered; ``algorithm_options`` go to its
    factory, or to the collective, as keyword arguments); ``density`` the fraction of each
    bucket sent, or a :class:`~sparsecoll.torch.density.DensitySchedule` that picks it each step
    (e.g. :class:`~sparsecoll.torch.density.Accordion`). With ``momentum_correction`` and a wrapped
    ``torch.optim.SGD``, the wrapper keeps SGD's momentum (and folds its weight decay into the
    gradient) itself, as DGC does, and runs SGD without them; other optimizers get error
    feedback only. ``momentum_masking=True`` adds DGC's momentum factor masking (momentum zeroed
    where a value was sent); off by default, since it leaves often-sent coordinates without
    momentum and costs epochs (README, "Epochs to accuracy"). Parameters for which ``dense_if`` is true (default: at most one dimension,
    i.e. biases and norms) are reduced dense. ``warmup_steps`` moves the density exponentially
    from 1 to ``density``; steps denser than ``dense_above`` use a dense allreduce (default
    "auto": where the step's pairs would send more bytes than the dense allreduce, at most 0.25;
    allgather's break even at density 1/P, half that against ``dense_fp16``). ``lazy`` (a
    :class:`~sparsecoll.collectives.lazy.LazyState` used as a template, one copy per bucket)
    works with "dense" (LAG, or LAQ with ``quantize_bits``), "allgather" and "auto".
    ``dense_fp16=True`` sends the plain dense reductions of float32 buckets (the warm-up's dense
    steps, dense buckets, "dense") as float16, as torch's ``fp16_compress_hook`` does: half the
    bytes of the warm-up, where a slow link spends most of a short run's time.
    ``quantize_bits`` (1, 2, 4 or 8) quantizes the values any builtin sends; "auto" picks the
    builtin the calibrated cost model prices fastest (``sparsecoll-bench calibrate``). ``grad_scaler`` (the ``torch.amp.GradScaler`` that calls
    ``step``) lets the wrapper tell the scaler when another rank overflowed, so every rank's
    scale follows the same path.

    ``error_feedback`` defaults to on, except for unbiased sparsifiers (``algorithm_options=
    {"selection": "randomk"}`` with "allgather", or the "randomk" compressor), which refuse it:
    error feedback keeps ``-g (1 - p) / p`` of every coordinate random-k did not send, which grows
    without bound (Wangni et al. 2018 send ``g / p`` and keep nothing). ``memory_beta`` is
    ScaleCom's low-pass filter on the error-feedback memory (None: the paper's 0.1 for "cltk", 1.0
    for the others). With ``lazy``, each step feeds LAG's rule the buckets' parameter steps and
    the step size ``lr / P`` (see :mod:`sparsecoll.collectives.lazy`). ``per_layer`` (Aji &
    Heafield's per-layer selection) gives every parameter its own bucket, so each layer sends its
    own ``density`` of values at its own threshold instead of competing with the other layers of
    a shared bucket for one cut (``bucket_bytes`` is then ignored). ``hierarchical`` (False,
    True or "auto") reduces in two levels on hosts with several ranks (see
    :mod:`sparsecoll.collectives.hierarchical`); it travels in the algorithm's options.

    Replicas start and stay identical, as under DDP: building the wrapper broadcasts rank 0's
    parameters (those of ``module`` too, and its buffers, when ``module`` is given); with
    ``module`` and ``broadcast_buffers`` (the default) every ``step()`` broadcasts rank 0's
    buffers (BatchNorm's running statistics) again, so that after each step parameters and
    buffers are the same on every rank, as a checkpoint or an evaluation should see them (DDP
    broadcasts before each forward instead; for several forwards a step, add
    :class:`~sparsecoll.torch.BufferBroadcast`, which does that). A parameter that gets a
    gradient but was frozen when the wrapper was built is in no bucket: ``step()`` raises on
    every rank rather than let it step on local gradients. A step whose gradient holds NaN or
    inf on any rank is skipped on every rank (``skipped_steps``; residuals and momentum are
    left as they were), or with ``skip_nonfinite=False`` raises NonFiniteGradientError on
    every rank; the group stays usable either way.

    ``overlap=True`` reduces each bucket while backward goes on (from the second step on: the
    first tells whether a GradScaler drives ``step()``, and then overlap stays off), to the same
    parameters bit for bit; ``backward()`` then returns with the mean over ranks in ``.grad``, as
    under DDP. It refuses ``clip_norm`` and ``grad_scaler`` (they need every bucket before the
    first leaves). Accumulate over several backward passes inside :meth:`no_sync`; a second
    backward before ``step()`` outside it raises InvalidArgumentError. A bucket with NaN/inf on
    any rank keeps its residual, but buckets reduced before that was known have spent theirs.

    Buckets, residuals and momentum keep the parameters' dtype: a bfloat16 model sends 2 bytes a
    value and keeps 2 bytes of residual (and of momentum) per parameter; ``residual_dtype=
    torch.float32`` keeps wider residuals and momentum (as DeepSpeed's error feedback does) and
    still sends bfloat16, the rounding staying in the residual.
    """

    _step_supports_amp_scaling = True

    def __init__(self, optimizer: torch.optim.Optimizer, group: SyncGroup, algorithm: str = "gtopk",
                 density: float | DensitySchedule = 0.001, *, quantize_bits: int | None = None,
                 error_feedback: bool | None = None, momentum_correction: bool = True, warmup_steps: int = 0,
                 momentum_masking: bool = False, lazy: LazyState | None = None,
                 clip_norm: float | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dense_if: Callable[[torch.Tensor], bool] | None = small_parameters,
                 dense_above: float | str = "auto", seed: int = 0, grad_scaler: Any = None,
                 skip_nonfinite: bool = True, algorithm_options: dict[str, Any] | None = None,
                 memory_beta: float | None = None, per_layer: bool = False,
                 module: torch.nn.Module | None = None, broadcast_buffers: bool = True,
                 residual_dtype: torch.dtype | None = None, hierarchical: bool | str = False,
                 overlap: bool = False, dense_fp16: bool = False) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"wrap a torch.optim.Optimizer, not {type(optimizer).__name__}")
        if not isinstance(group, SyncGroup):
            raise TypeError("group must be a SyncGroup: create it with sparsecoll.torch.init_group()")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if clip_norm is not None and clip_norm <= 0:
            raise ValueError(f"clip_norm must be positive, got {clip_norm}")
        if lazy is not None and dense_fp16:
            raise ValueError("dense_fp16 does not combine with lazy= (a lazy round's dense allreduce stays float32)")
        if lazy is not None and algorithm not in LAZY_ALGORITHMS:
            raise ValueError(f"lazy aggregation needs algorithm 'dense', 'allgather' or 'auto' (the others "
                             f"have no per-rank contribution to reuse), not {algorithm!r}")
        self.density_schedule = density if isinstance(density, DensitySchedule) else None
        """What decides each step's density (e.g. :class:`~sparsecoll.torch.density.Accordion`), or None."""
        if self.density_schedule is not None:
            density = self.density_schedule.sparsest
        self.compression = Compression(algorithm, float(density), quantize_bits, error_feedback,
                                       dense_above, int(seed), with_hierarchical(algorithm_options, hierarchical),
                                       memory_beta, dense_fp16=bool(dense_fp16))
        self.compression.validate()
        self.optimizer = optimizer
        self.sync = group
        self.warmup_steps = int(warmup_steps)
        self.clip_norm = clip_norm
        self.grad_scaler = grad_scaler
        self.skip_nonfinite = skip_nonfinite
        self.momentum_correction = momentum_correction and isinstance(optimizer, torch.optim.SGD)
        self.momentum_masking = bool(momentum_masking)
        if self.momentum_correction:
            for param_group in optimizer.param_groups:
                if param_group.get("dampening", 0) != 0:
                    raise ValueError("momentum correction accumulates undampened momentum (DGC): "
                                     "use dampening=0 or momentum_correction=False")
        for hooks in _HOOK_TABLES:  # what Optimizer.__init__ sets up for torch's register_*_hook methods
            setattr(self, hooks, OrderedDict())
        self.per_layer = bool(per_layer)
        self._bucket_bytes = 1 if per_layer else bucket_bytes
        self._dense_if = dense_if
        self._lazy = lazy
        self.residual_dtype = residual_dtype
        self.overlap = resolve_overlap(overlap, clip_norm=clip_norm, grad_scaler=grad_scaler,
                                       density_schedule=self.density_schedule)
        self._scheduler = OverlapScheduler(group, self._reduce_on_lane) if self.overlap else None
        self.buckets: list[Bucket] = []
        self.memories: list[ErrorFeedback] = []
        self.lazy_states: list[LazyState | None] = []
        self.algorithm_states: list = []
        """Per bucket, the algorithm's memory between steps (Ok-Topk's thresholds), else None."""
        self._bucketed: set[int] = set()
        self._add_buckets(build_buckets(optimizer.param_groups, self._bucket_bytes, dense_if))
        self.steps = 0
        """Steps taken (skipped AMP steps do not count); drives the warm-up and the seeds."""
        self.skipped_steps = 0
        self.last_stats = CommStats()
        """What the last step moved, all buckets together, as seen by this rank."""
        self._layout = layout_signature(self.buckets)
        self._layout_checked = False
        self._check_layout()
        self.module = module
        self.broadcast_buffers = broadcast_buffers
        broadcast_tensors(group, replicated_tensors(optimizer.param_groups, module))

    # ------------------------------------------------------- the wrapped optimizer's face
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    def __repr__(self) -> str:
        c = self.compression
        return (f"SparseCollOptimizer({type(self.optimizer).__name__}, algorithm={c.algorithm!r}, "
                f"density={c.density}, buckets={len(self.buckets)}, rank={self.sync.rank}/{self.sync.size})")

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the wrapped optimizer and give its trainable parameters new buckets.

        A collective, as building the wrapper is: every rank adds the same group (checked, with
        CollectiveMismatchError on every rank otherwise) and gets rank 0's values of its
        parameters.
        """
        if self.momentum_correction and param_group.get("dampening", 0) != 0:
            raise ValueError("momentum correction accumulates undampened momentum (DGC): use dampening=0")
        params = param_group["params"]
        param_group = {**param_group, "params": [params] if isinstance(params, torch.Tensor) else list(params)}
        added = build_buckets([param_group], self._bucket_bytes, self._dense_if)
        for bucket in added:
            bucket.index += len(self.buckets)
            bucket.group_index = len(self.param_groups)
        layout = layout_signature([*self.buckets, *added])
        self.sync.run(check_layout(self.sync.group, layout))  # before anything changes, on every rank
        self.optimizer.add_param_group(param_group)
        self._add_buckets(added)
        self._layout = layout
        broadcast_tensors(self.sync, param_group["params"])

    def _add_buckets(self, buckets: list[Bucket]) -> None:
        for bucket in buckets:
            self.buckets.append(bucket)
            self.memories.append(ErrorFeedback(bucket.flat, self.residual_dtype, self.momentum_masking))
            lazy = self._lazy
            self.lazy_states.append(None if lazy is None else lazy.fresh())
            self.algorithm_states.append(self.compression.new_state())
            self._bucketed.update(id(param) for param in bucket.params)
            if self._scheduler is not None:
                self._scheduler.add([bucket])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's optimizers: every gradient becomes None (or zero, with ``set_to_none=False``).

        After the default, backward writes each gradient into a tensor of its own, which the
        step takes as its bucket's buffer or copies in once (see
        :meth:`~sparsecoll.torch.buckets.Bucket.gather_grads`); with ``set_to_none=False``
        backward accumulates into the zeroed bucket regions. With overlap, reductions that a
        backward launched but no ``step()`` used are completed and dropped first.
        """
        if self._scheduler is not None:
            self._scheduler.abandon()
        for bucket in self.buckets:
            bucket.zero_grads(set_to_none)
        for param_group in self.param_groups:
            for param in param_group["params"]:
                if id(param) not in self._bucketed and param.grad is not None:
                    if set_to_none:
                        param.grad = None
                    else:
                        param.grad.zero_()

    def density_now(self) -> float:
        """The density of this step, for ``step()`` (once a step): the warm-up of ``density`` or of its
        schedule's choice (with a schedule this is part of the step: it sees the gradients and may
        agree with the other ranks)."""
        target = self.compression.density if self.density_schedule is None else self.density_schedule.for_step(
            self.steps, [bucket.gradient for bucket in self.buckets], self.sync)
        return warmup_density(self.steps, target, self.warmup_steps)

    # ------------------------------------------------------------------------ the step
    @torch.optim.Optimizer.profile_hook_step  # runs the register_step_pre_hook / _post_hook hooks
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Exchange the gradients compressed, then step the wrapped optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_layout()
        if self.module is not None and self.broadcast_buffers:
            broadcast_tensors(self.sync, self.module.buffers())
        stray = self._stray_parameter()
        if self.overlapping:
            self._overlapped_step(stray)
            return loss
        for bucket in self.buckets:
            bucket.gather_grads()
        local_flags = self._local_flags(stray)  # unscales under AMP: clipping below measures the true norm
        prepared = self._prepare_exchange()
        # one round trip to the loop, unless a density schedule must agree on the step's density first
        scheduled = self.density_schedule is not None
        agreed, stats = self.sync.run(self._agree_then_exchange(local_flags, prepared, exchange=not scheduled))
        if self._skip_this_step(agreed, stray):
            self.skipped_steps += 1
        else:
            if stats is None:
                stats = self.sync.run(self._exchange(self.density_now(), prepared))
            self.last_stats = stats
            self._apply()
        self._start_overlap()
        return loss

    def _prepare_exchange(self) -> _Prepared:
        """What the exchange needs from the calling thread: each bucket's CUDA device and stream,
        and local clipping's factor (its norm is read on this thread's stream; a NaN step's
        factor is never used)."""
        launches = [capture(bucket.flat) for bucket in self.buckets]
        scale = 1.0
        if self.clip_norm is not None and self.clip_squared_norm is not None:  # None: AMP overflowed, no step
            _, scale = clip_factor(self.clip_squared_norm, self.clip_norm, self.sync.size)  # read with the NaN check
        return _Prepared(launches, scale)

    async def _agree_then_exchange(self, local_flags: tuple[bool, bool, bool], prepared: _Prepared,
                                   exchange: bool = True) -> tuple[tuple[bool, bool, bool], CommStats | None]:
        """On the group's loop: agree on the flags, then, with ``exchange`` and unless the step is
        off (or will raise), exchange every bucket. Returns the agreed flags and the exchange's
        statistics (None when nothing was exchanged)."""
        agreed = await any_rank_flags(self.sync.group, *local_flags)
        if any(agreed) or not exchange:
            return agreed, None
        return agreed, await self._exchange(self.density_now(), prepared)

    def _apply(self) -> None:
        """The reduced gradients into ``.grad``, then the wrapped optimizer's step."""
        for bucket in self.buckets:
            bucket.scatter_grads()
        before = self._lazy_parameters()
        self._inner_step()
        self._record_parameter_steps(before)
        self.steps += 1

    def _lazy_parameters(self) -> list[list[torch.Tensor] | None]:
        """Copies of the lazy buckets' parameters before the step (LAG's rule needs its size)."""
        return [None if lazy is None else [param.detach().clone() for param in bucket.params]
                for bucket, lazy in zip(self.buckets, self.lazy_states)]

    def _record_parameter_steps(self, before: list[list[torch.Tensor] | None]) -> None:
        """Feed each lazy bucket's rule ``||theta^{k+1} - theta^k||^2`` and ``alpha = lr / P``."""
        for bucket, lazy, old in zip(self.buckets, self.lazy_states, before):
            lr = float(self.param_groups[bucket.group_index].get("lr", 0.0))
            if lazy is None or lr <= 0:
                continue
            squared = sum(float(torch.sum((param.detach() - copy).double() ** 2))
                          for param, copy in zip(bucket.params, old))
            lazy.record_parameter_step(squared, lr / self.sync.size)

    def _check_layout(self) -> None:
        """CollectiveMismatchError on every rank unless all ranks bucket the same parameters."""
        if not self._layout_checked:
            self.sync.run(check_layout(self.sync.group, self._layout))
            self._layout_checked = True

    def _momentum_of(self, bucket) -> tuple[float, bool]:
        """Momentum and Nesterov flag the wrapper applies to ``bucket``; folds weight decay in."""
        if not self.momentum_correction:
            return 0.0, False
        param_group = self.param_groups[bucket.group_index]
        weight_decay = param_group.get("weight_decay", 0.0)
        if weight_decay:  # folded in by the pass that reads the gradient (ErrorFeedback.prepare)
            memory = self.memories[bucket.index]
            memory.fold(grad_scale=memory.grad_scale, weight_decay=weight_decay,
                        parameters=list(zip(bucket.offsets, bucket.params)))
        return float(param_group.get("momentum", 0.0)), bool(param_group.get("nesterov", False))

    async def _exchange(self, density: float, prepared: _Prepared) -> CommStats:
        """On the group's loop: local clipping's factor and weight decay folded into the pass,
        then every bucket reduced at ``density`` (CUDA work on the calling thread's device and
        stream, ``prepared.launches``); their statistics summed."""
        launches = prepared.launches
        if prepared.clip_scale != 1.0:  # the factor rides on the fused pass (ErrorFeedback.fold)
            for memory in self.memories:
                memory.fold(grad_scale=prepared.clip_scale)
        hyper = [self._momentum_of(bucket) for bucket in self.buckets]
        group = self.sync.group
        compression = self.compression
        if compression.algorithm == "auto":  # its first use is a collective: before the buckets'
            await shared_cost_model(group)
        # tasks start in bucket order on every rank, so the collectives' sequence numbers match
        per_bucket = await asyncio.gather(*(
            reduce_buffer(group, bucket.flat, memory, compression, density=density, step=self.steps,
                          seed=compression.seed + 1000003 * bucket.index, compressed=bucket.compressed,
                          momentum=momentum, nesterov=nesterov, lazy=lazy, algorithm_state=algorithm_state,
                          launch=launch, source=bucket.source)
            for bucket, memory, lazy, algorithm_state, (momentum, nesterov), launch
            in zip(self.buckets, self.memories, self.lazy_states, self.algorithm_states, hyper, launches)))
        total = CommStats()
        for stats in per_bucket:
            total += stats
        return total

    def _inner_step(self) -> None:
        if sparse_sgd_applies(self.optimizer, self._taken_over()):
            apply_sgd(self.optimizer, self.buckets, self.memories)
            return
        if not self.momentum_correction:
            self.optimizer.step()
            return
        saved = [{name: group[name] for name in _TAKEN_OVER if name in group} for group in self.param_groups]
        try:
            for group in self.param_groups:
                for name in _TAKEN_OVER:
                    if name in group:
                        group[name] = False if name == "nesterov" else 0.0
            self.optimizer.step()
        finally:
            for group, values in zip(self.param_groups, saved):
                group.update(values)

    def _taken_over(self) -> tuple[str, ...]:
        """The wrapped SGD's settings the wrapper applies itself (momentum correction)."""
        return _TAKEN_OVER if self.momentum_correction else ()

    # ------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state and this rank's residuals, momentum and step.

        Residuals differ between ranks, so every rank saves its own:
        ``torch.save(opt.state_dict(), f"opt-rank{group.rank}.pt")`` (no collective is
        involved, so saving from one rank only loses the others' residuals).
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = {"optimizer": self.optimizer.state_dict(),
                 "sparsecoll": {"rank": self.sync.rank, "world_size": self.sync.size, "steps": self.steps,
                               "skipped_steps": self.skipped_steps,
                               "layout": self._layout.tolist(),
                               "memories": [memory.state_dict() for memory in self.memories],
                               "lazy": [None if lazy is None else lazy.state_dict() for lazy in self.lazy_states],
                               "algorithm": [None if kept is None else kept.state_dict()
                                             for kept in self.algorithm_states],
                               "density_schedule": None if self.density_schedule is None
                               else self.density_schedule.state_dict()}}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            returned = post_hook(self, state)
            if returned is not None:
                state = returned
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore this rank's state saved by :meth:`state_dict` on the same rank of the same world."""
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            returned = pre_hook(self, state_dict)
            if returned is not None:
                state_dict = returned
        ours = state_dict["sparsecoll"]
        if (ours["rank"], ours["world_size"]) != (self.sync.rank, self.sync.size):
            raise ValueError(f"this state was saved by rank {ours['rank']} of {ours['world_size']}; "
                             f"rank {self.sync.rank} of {self.sync.size} must load its own file")
        if not np.array_equal(np.asarray(ours["layout"], np.int64), self._layout):
            raise ValueError("the saved state belongs to a different parameter layout")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        for memory, saved in zip(self.memories, ours["memories"]):
            memory.load_state_dict(saved)
        for lazy, saved in zip(self.lazy_states, ours["lazy"]):
            if lazy is not None and saved is not None:
                lazy.load_state_dict(saved)
        for kept, saved in zip(self.algorithm_states, ours.get("algorithm", ())):
            if kept is not None and saved is not None:
                kept.load_state_dict(saved)
        if self.density_schedule is not None and ours.get("density_schedule") is not None:
            self.density_schedule.load_state_dict(ours["density_schedule"])
        self.steps = int(ours["steps"])
        self.skipped_steps = int(ours["skipped_steps"])
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

