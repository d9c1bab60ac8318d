"""A DDP communication hook that reduces DDP's buckets with sparsecoll's compressed collectives.

For users who keep ``DistributedDataParallel``::

    state = CommHookState(sparsecoll.torch.init_group(), algorithm="gtopk", density=0.01)
    model.register_comm_hook(state, comm_hook)

torch's default process group (e.g. Gloo) carries only what DDP itself sends (the initial
parameter broadcast, unused-parameter maps); gradients travel over the sparsecoll group. The
hook keeps the same error-feedback state as :class:`~sparsecoll.torch.SparseCollOptimizer`, per
DDP bucket. Momentum correction needs the hook to own the momentum: give ``momentum=`` here
and build the optimizer with ``momentum=0``; ``momentum_masking=True`` adds DGC's masking (off by
default, as for SparseCollOptimizer).
"""

# no ``from __future__ import annotations``: DDP checks the hook's annotations as objects
import math
import warnings
from concurrent.futures import Future as ConcurrentFuture
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sparsecoll.call import CommStats
from sparsecoll.group import Group
from sparsecoll.sync import SyncGroup
from sparsecoll.torch.density import DensitySchedule
from sparsecoll.torch.device_launch import capture, future_devices, launching
from sparsecoll.torch.error_feedback import ErrorFeedback, warmup_density
from sparsecoll.errors import InvalidArgumentError, NonFiniteGradientError, PerBucketDensityWarning
from sparsecoll.torch.exchange import Compression, all_finite, any_rank_flags, reduce_buffer, with_hierarchical
from sparsecoll.torch.overlap import wait_all
from sparsecoll.torch.sparse_update import sgd_at, sparse_sgd_applies


class CommHookState:
    """Hyperparameters and per-bucket memory of :func:`comm_hook` (one per DDP model).

    ``start_iter`` iterations are reduced dense first: DDP rebuilds its buckets after the
    first iteration, and state kept for the old buckets would not fit the new ones (the
    same reason as PowerSGD's ``start_powerSGD_iter``). Give ``module`` (the DDP model) to
    keep the state per parameter rather than per bucket: a bucket whose parameters change
    (DDP's rebuild, or a fresh model after :meth:`load_state_dict`) then takes over their
    residuals and momentum (and the algorithm's state, e.g. Ok-Topk's thresholds, by the set of
    parameters), so a run resumes exactly; without it a bucket whose parameter sizes, in order,
    changed starts afresh: a fresh DDP model's first buckets follow the parameters' order, not the
    rebuilt order a state was saved in, so an exact resume needs ``module``.

    ``error_feedback`` and ``memory_beta`` (ScaleCom's filter) default and refuse as in
    :class:`~sparsecoll.torch.SparseCollOptimizer`: off, and refused, for unbiased random-k;
    so does ``hierarchical`` (two-level reduction on hosts with several ranks), and
    ``dense_fp16`` (dense reductions, warm-up's included, sent as float16).

    A bucket that holds NaN or inf on any rank is not reduced and leaves every rank's residual
    and momentum as they were (the ranks agree by one small allreduce a bucket). A hook cannot
    skip the optimizer's step, so with ``skip_nonfinite`` (the default) every rank gets the
    bucket filled with NaN, as DDP's own allreduce would give it: ``torch.amp.GradScaler`` then
    skips the step on every rank alike (without a scaler, check ``skipped_steps`` before
    stepping). With ``skip_nonfinite=False`` the hook's future fails with
    NonFiniteGradientError on every rank instead. The group stays usable either way. Under AMP
    give the scaler as ``grad_scaler``: the buckets then hold gradients times its loss scale, and
    the residuals and momenta kept from them follow each change of that scale (see
    :meth:`follow_loss_scale`); without it a step after a change adds the old scale's residual to
    the new scale's gradient.

    DDP calls the hook bucket by bucket as backward produces them; each bucket reduces on its own
    lane (a sub-group of all ranks with its own sequence numbers, see
    :mod:`sparsecoll.torch.overlap`), so the buckets' reductions run concurrently on the group's
    loop, and their finite-flag agreements and collectives pair by bucket on every rank.

    DDP itself broadcasts rank 0's parameters and buffers when it wraps the module (and the
    buffers before every forward with ``broadcast_buffers=True``) over torch's process group,
    so the hook needs no broadcast of its own.
    """

    __slots__ = ("group", "compression", "momentum", "nesterov", "warmup_steps", "start_iter",
                 "iteration", "memories", "algorithm_states", "last_stats", "skip_nonfinite", "skipped_steps", "residual_dtype",
                 "momentum_masking", "_lanes", "_in_flight", "_names", "_layouts", "_saved", "_skipped_at", "density_schedule", "_scheduled",
                 "_bucket_params", "sparse_steps", "_saved_algorithm",
                 "grad_scaler", "_loss_scale", "_scale_read_at", "_warned_split")

    def __init__(self, group: SyncGroup, algorithm: str = "gtopk", density: "float | DensitySchedule" = 0.001, *,
                 quantize_bits: int | None = None, error_feedback: bool | None = None, momentum: float = 0.0,
                 nesterov: bool = False, momentum_masking: bool = False, warmup_steps: int = 0, start_iter: int = 1,
                 dense_above: float | str = "auto", seed: int = 0,
                 algorithm_options: dict[str, Any] | None = None, module: Any = None,
                 memory_beta: float | None = None, skip_nonfinite: bool = True,
                 residual_dtype: torch.dtype | None = None, hierarchical: bool | str = False,
                 dense_fp16: bool = False, grad_scaler: Any = None) -> None:
        if not isinstance(group, SyncGroup):
            raise TypeError("group must be a SyncGroup: create it with sparsecoll.torch.init_group()")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if warmup_steps < 0 or start_iter < 0:
            raise ValueError("warmup_steps and start_iter must be >= 0")
        self.group = group
        self.density_schedule = density if isinstance(density, DensitySchedule) else None
        """What picks each iteration's density (as for SparseCollOptimizer), or None."""
        self._scheduled: tuple[int, float] | None = None
        if self.density_schedule is not None:
            density = self.density_schedule.sparsest
        self.compression = Compression(algorithm, float(density), quantize_bits, error_feedback,
                                       dense_above, int(seed), with_hierarchical(algorithm_options, hierarchical),
                                       memory_beta, dense_fp16=bool(dense_fp16))
        self.compression.validate()
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.momentum_masking = bool(momentum_masking)
        self.warmup_steps = int(warmup_steps)
        self.start_iter = int(start_iter)
        self.iteration = 0
        self.memories: dict[int, ErrorFeedback] = {}
        self.algorithm_states: dict[int, Any] = {}
        """Per bucket, the algorithm's memory between iterations (Ok-Topk's thresholds)."""
        self.last_stats: dict[int, CommStats] = {}
        """What each bucket's last reduction moved, by bucket index."""
        self.skip_nonfinite = bool(skip_nonfinite)
        self.residual_dtype = residual_dtype
        """Dtype of residuals and momentum (default: the bucket's, e.g. bfloat16 for a bf16 model)."""
        self.skipped_steps = 0
        """Iterations in which some bucket held NaN/inf on some rank and was not reduced."""
        self._skipped_at = -1
        self._lanes: dict[int, Group] = {}
        self._in_flight: set[ConcurrentFuture] = set()
        self._names = None if module is None else {id(param): name for name, param in module.named_parameters()}
        self._layouts: dict[int, tuple] = {}
        self._saved: dict[str, dict] = {}
        self.sparse_steps = 0
        """Steps :meth:`sgd_step` took itself (plain SGD at the k indices), not handed to ``step()``."""
        self._bucket_params: dict[int, tuple[int, list[torch.Tensor]]] = {}
        """Each DDP bucket's iteration and parameters, in its buffer's order, as the hook last saw them."""
        self._saved_algorithm: dict[frozenset, dict] = {}
        """Loaded or parked algorithm states (Ok-Topk's thresholds) not yet taken by a bucket, by
        the set of the bucket's parameters (``module`` given; without it they load by bucket index
        at once)."""
        self.grad_scaler = grad_scaler
        """The ``torch.amp.GradScaler`` whose scaled gradients DDP hands the hook, or None."""
        self._loss_scale: float | None = None
        """The loss scale the residuals and momenta are in (None: none kept yet, or no scaler)."""
        self._scale_read_at = -1
        self._warned_split = False

    def _warn_split_buckets(self, buckets: int) -> None:
        """Warn once that DDP reduces the model in ``buckets`` buckets, each compressed on its
        own at the density: a top-k per bucket, not over the model. On the MNIST CNN at 0.1%
        that ended 5 points lower than one bucket (87.2% against 93.1%, and 92.0% against 94.2%
        at 1%), since a bucket of small gradients gets as large a share of k as one of large
        gradients. One bucket (``bucket_cap_mb`` above the model's size, which also caps DDP's
        first bucket) selects over the whole model, at the cost of starting the reduction after
        backward."""
        if self._warned_split:
            return
        compression = self.compression
        params = [param for iteration, bucket in self._bucket_params.values() if iteration == self.iteration
                  for param in bucket]
        numel = sum(param.numel() for param in params)
        if not params or not compression.sparse_at(compression.density, self.group.size, numel,
                                                    params[0].element_size()):
            return
        self._warned_split = True
        size = sum(param.numel() * param.element_size() for param in params)
        warnings.warn(PerBucketDensityWarning(
            f"DDP reduces this model in {buckets} buckets and the sparsecoll hook compresses each on its "
            f"own at density {compression.density:g} (a top-k per bucket, not over the model), which can "
            f"cost accuracy at low density; for one bucket give DistributedDataParallel "
            f"bucket_cap_mb={math.ceil(size / 2**20) + 1}"), stacklevel=3)

    def follow_loss_scale(self) -> None:
        """Under AMP the buckets hold gradients times the loss scale, and so do the residuals and
        momenta kept from them: when the scaler has changed its scale since (it doubles after a
        run of finite steps and halves after an overflow), bring them to the new one, so that
        the next step adds like to like. Read once an iteration, at its first bucket (a device
        sync on a GPU); a scale of a power of two rescales exactly."""
        if self.grad_scaler is None or self._scale_read_at == self.iteration:
            return
        self._scale_read_at = self.iteration
        scale = float(self.grad_scaler.get_scale()) if self.grad_scaler.is_enabled() else 1.0
        if self._loss_scale is not None and scale != self._loss_scale:
            factor = scale / self._loss_scale
            for memory in self.memories.values():
                memory.rescale(factor)
            for saved in self._saved.values():
                for name in ("residual", "momentum"):
                    if saved.get(name) is not None:
                        saved[name].mul_(factor)
        self._loss_scale = scale

    def density_now(self, index: int = 0, buffer: torch.Tensor | None = None) -> float:
        """Density of the current iteration (1.0 before ``start_iter``). A schedule decides at the
        iteration's first bucket (its agreement queued behind the buckets before it, in rank-wide
        order) and sees ``buffer``, this rank's gradient of bucket ``index`` (None: not finite)."""
        if self.iteration < self.start_iter:
            return 1.0
        step = self.iteration - self.start_iter
        target = self.compression.density
        if self.density_schedule is not None:
            if self._scheduled is None or self._scheduled[0] != self.iteration:
                self._scheduled = (self.iteration, self.density_schedule.density_for(step, self._agree))
            target = self._scheduled[1]
            if buffer is not None:
                self.density_schedule.observe(index, buffer, self._loss_scale or 1.0)  # AMP's scale
        return warmup_density(step, target, self.warmup_steps)

    def _agree(self, values: np.ndarray) -> np.ndarray:
        """The mean of every rank's ``values`` (see :func:`~sparsecoll.torch.density.mean_over`)."""
        total, _ = self.submit(self.group.group.allreduce(np.ascontiguousarray(values, np.float64),
                                                          op="mean")).result()
        return np.asarray(total, np.float64)

    def lane(self, index: int) -> Group:
        """The sub-group bucket ``index`` reduces on (made on first use: DDP calls the hook in
        bucket order, the same on every rank, so every rank makes its lanes in the same order)."""
        lane = self._lanes.get(index)
        if lane is None:
            lane = self._lanes[index] = self.group.group.new_group(range(self.group.size), f"ddp-bucket-{index}")
        return lane

    def submit(self, coroutine: Any) -> ConcurrentFuture:
        """Start ``coroutine`` on the group's loop at once, concurrently with those before it."""
        future = self.group.submit(coroutine)
        self._in_flight.add(future)
        future.add_done_callback(self._in_flight.discard)
        return future

    def sgd_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """``optimizer.step()`` for a plain SGD (what momentum correction leaves it), taken where
        this iteration's reduced gradients can be nonzero: at each sparse bucket's k indices,
        over the whole parameter elsewhere (dense buckets, warm-up, parameters in no bucket), with
        the parameters SGD's dense step would give, bit for bit. After DDP's backward its buckets'
        gradients are zero but for those k entries, so the dense step reads and writes every
        parameter to move k of them. Any other optimizer, setting or step hook takes its own
        ``step()``. Returns False, stepping nothing, when a bucket held NaN/inf on some rank this
        iteration (the hook gave it as NaN: what a GradScaler would skip), else True. Under AMP
        (``grad_scaler`` given) it raises InvalidArgumentError: the gradients are still scaled,
        and ``scaler.step(optimizer)`` unscales them before its step.
        """
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            raise InvalidArgumentError("sgd_step under AMP would step the loss-scaled gradients: step with "
                                       "scaler.step(optimizer), which unscales them first", rank=self.group.rank)
        if self._skipped_at == self.iteration - 1:
            return False
        if not sparse_sgd_applies(optimizer):
            optimizer.step()
            return True
        lrs = {id(param): float(group["lr"]) for group in optimizer.param_groups for param in group["params"]}
        stepped: set[int] = set()
        for index, (iteration, params) in self._bucket_params.items():
            if iteration != self.iteration - 1:  # a bucket of a layout DDP has since rebuilt
                continue
            memory = self.memories.get(index)
            offsets = np.cumsum([0] + [param.numel() for param in params[:-1]]).tolist()
            mine = [(param, offset) for param, offset in zip(params, offsets) if id(param) in lrs]
            sgd_at([param for param, _ in mine], [offset for _, offset in mine],
                   None if memory is None else memory.update_indices, [lrs[id(param)] for param, _ in mine])
            stepped.update(id(param) for param, _ in mine)
        others = [param for group in optimizer.param_groups for param in group["params"] if id(param) not in stepped]
        sgd_at(others, [0] * len(others), None, [lrs[id(param)] for param in others])
        self.sparse_steps += 1
        optimizer._opt_called = True  # what torch's LR scheduler records of a step() (else it warns)
        return True

    def close(self) -> None:
        """Wait for the reductions still in flight (the group stays open)."""
        wait_all(self.group, list(self._in_flight))

    def state_dict(self) -> dict[str, Any]:
        """This rank's residuals and momentum (per parameter with ``module``, else per bucket),
        each bucket's algorithm state (Ok-Topk's thresholds, by the bucket's parameters with
        ``module``) and the iteration: save it per rank."""
        state = {"rank": self.group.rank, "world_size": self.group.size, "iteration": self.iteration,
                 "loss_scale": self._loss_scale,
                 "density_schedule": None if self.density_schedule is None else self.density_schedule.state_dict(),
                 "algorithm": [{"bucket": index, "layout": None if self._names is None
                                else sorted(self._layouts.get(index) or ()), "state": kept.state_dict()}
                               for index, kept in self.algorithm_states.items() if kept is not None]}
        if self._names is None:
            state["memories"] = {index: memory.state_dict() for index, memory in self.memories.items()}
            state["bucket_sizes"] = {index: list(self._layouts.get(index) or ()) for index in self.memories}
        else:
            state["parameters"] = {**self._saved, **self._per_parameter()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned on the same rank."""
        if (state["rank"], state["world_size"]) != (self.group.rank, self.group.size):
            raise ValueError(f"this state was saved by rank {state['rank']} of {state['world_size']}")
        if ("parameters" in state) != (self._names is not None):
            raise ValueError("a state saved with module= loads only with module=, and one saved without "
                             "it only without")
        self.iteration = int(state["iteration"])
        self._loss_scale, self._scale_read_at = state.get("loss_scale"), -1
        if self.density_schedule is not None and state.get("density_schedule") is not None:
            self.density_schedule.load_state_dict(state["density_schedule"])
        self.memories, self._layouts, self.algorithm_states = {}, {}, {}
        self._saved_algorithm = {}
        for saved in state.get("algorithm", ()):
            if saved["layout"] is not None:  # taken by the bucket that holds these parameters again
                self._saved_algorithm[frozenset(map(tuple, saved["layout"]))] = saved["state"]
            elif (kept := self.compression.new_state()) is not None:
                kept.load_state_dict(saved["state"])
                self.algorithm_states[int(saved["bucket"])] = kept
        self._saved = {name: {key: None if value is None else value.clone() for key, value in saved.items()}
                       for name, saved in state.get("parameters", {}).items()}
        for index, saved in state.get("memories", {}).items():
            memory = ErrorFeedback(saved["residual"], momentum_masking=self.momentum_masking)
            memory.load_state_dict(saved)
            self.memories[int(index)] = memory
            self._layouts[int(index)] = tuple(state.get("bucket_sizes", {}).get(index, ()))

    def memory_for(self, index: int, work: torch.Tensor, params: list[torch.Tensor]) -> ErrorFeedback:
        """The memory of bucket ``index``; rebuilt from its parameters' state if they changed."""
        memory = self.memories.get(index)
        layout = (tuple(param.numel() for param in params) if self._names is None  # sizes, in bucket order
                  else tuple((self._names.get(id(param), ""), param.numel()) for param in params))
        if (memory is not None and memory.residual.numel() == work.numel()
                and memory.residual.dtype == (self.residual_dtype or work.dtype)
                and self._layouts.get(index) == layout):
            return memory
        if self._names is not None:  # park every parameter's state, and retire buckets that lose some
            self._saved.update(self._per_parameter())
            self._saved_algorithm.update(self._per_parameter_set())
            names = {name for name, _ in layout}
            for other in [other for other, old in self._layouts.items()
                          if other != index and old and names & {name for name, _ in old}]:
                self.memories.pop(other, None)
                self._layouts.pop(other, None)
        memory = self.memories[index] = ErrorFeedback(work, self.residual_dtype, self.momentum_masking)
        kept = self.algorithm_states[index] = self.compression.new_state()
        saved_algorithm = None if self._names is None else self._saved_algorithm.pop(frozenset(layout), None)
        if kept is not None and saved_algorithm is not None:
            kept.load_state_dict(saved_algorithm)
        self._layouts[index] = layout
        if self._names is not None:
            offset = 0
            for name, numel in layout:
                saved = self._saved.pop(name, None)
                if saved is not None and saved["residual"].numel() == numel:
                    memory.restore_slice(offset, saved["residual"], saved["momentum"])
                offset += numel
        return memory

    def _per_parameter_set(self) -> dict[frozenset, dict]:
        """Every bucket's algorithm state by the set of its parameters (names and sizes): a bucket
        that DDP rebuilds in another order, or a fresh model's first bucket, takes it over."""
        return {frozenset(self._layouts[index]): kept.state_dict() for index, kept in self.algorithm_states.items()
                if kept is not None and self._layouts.get(index)}

    def _per_parameter(self) -> dict[str, dict]:
        """Every bucket's memory cut into its parameters' slices, by parameter name."""
        cut: dict[str, dict] = {}
        for index, memory in self.memories.items():
            offset = 0
            for name, numel in self._layouts.get(index) or ():
                cut[name] = memory.slice_state(offset, numel)
                offset += numel
        return cut


def comm_hook(state: CommHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket`` over the ranks with error feedback; a future of the reduced buffer.

    1. take (or make) the bucket's memory (see :meth:`CommHookState.memory_for`);
    2. agree with the other ranks whether the bucket is finite everywhere; if not, skip 3 (see
       :class:`CommHookState`);
    3. before ``start_iter`` reduce dense, then compress at the warm-up's density, on the
       bucket's lane, while backward and the other buckets' reductions go on;
    4. write the mean into the bucket's buffer and complete the future with it (on a GPU the
       future carries the bucket's device, and the work runs on the stream that was current in
       the autograd thread that called this hook, so DDP waits on that stream, not on the host).
    """
    buffer = bucket.buffer()
    index = bucket.index()
    work = buffer
    state.follow_loss_scale()
    memory = state.memory_for(index, work, bucket.parameters())
    state._bucket_params[index] = (state.iteration, list(bucket.parameters()))
    compressed = state.iteration >= state.start_iter
    if compressed and index > 0 and bucket.is_last():
        state._warn_split_buckets(index + 1)
    iteration = state.iteration
    local_nonfinite = not all_finite(work)
    lane = state.lane(index)
    launch = capture(work)  # this (autograd) thread's device and stream
    reduction = reduce_buffer(lane, work, memory, state.compression,
                              density=state.density_now(index, None if local_nonfinite else work),
                              step=state.iteration,
                              seed=state.compression.seed + 1000003 * index, compressed=compressed,
                              momentum=state.momentum, nesterov=state.nesterov,
                              algorithm_state=state.algorithm_states.setdefault(index, state.compression.new_state()),
                              launch=launch)

    async def reduce_if_finite() -> CommStats | None:
        if not await any_rank_flags(lane, local_nonfinite):
            return await reduction
        reduction.close()  # never started: the residual and momentum stay as they were
        if not state.skip_nonfinite:
            raise NonFiniteGradientError(f"DDP bucket {index} held NaN or inf at iteration {iteration} (on "
                                         "this rank or another); nothing was sent", rank=state.group.rank)
        return None

    if bucket.is_last():
        state.iteration += 1
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future(devices=future_devices(buffer))

    def complete(done: ConcurrentFuture) -> None:
        error = done.exception()
        if error is not None:
            future.set_exception(error)
            return
        stats = done.result()
        if stats is None:
            work.fill_(float("nan"))
            if state._skipped_at != iteration:
                state._skipped_at = iteration
                state.skipped_steps += 1
        else:
            state.last_stats[index] = stats
        with launching(launch):  # the copy and the future's CUDA event go on the hook's stream
            if work is not buffer:
                buffer.copy_(work)
            future.set_result(buffer)

    state.submit(reduce_if_finite()).add_done_callback(complete)
    return future
