"""How each row of ``sparsecoll-bench train`` takes a step: sparsecoll's optimizer or DDP hook,
or what a torch user would pick instead (DDP over Gloo, its fp16 hook, its PowerSGD hook).

Every method is built from the same model (same seed) and SGD (momentum 0.9), and reports what
it put on the wire in a step (``bytes_sent``, this rank's payload):

- ``optimizer``: :class:`~sparsecoll.torch.SparseCollOptimizer`; its CommStats.
- ``hook``: DDP with sparsecoll's comm hook; the hook owns the momentum (SGD runs with none),
  as its momentum correction needs; the buckets' CommStats.
- ``ddp``: DDP's own allreduce over Gloo; ``fp16``: torch's ``fp16_compress_hook``;
  ``powersgd``: torch's ``powerSGD_hook`` with error feedback and warm start (its defaults),
  ``start_powerSGD_iter`` = 10% of the run's steps (at least 2), as torch's docs advise, and
  the whole gradient in one DDP bucket (:func:`one_bucket_mb`): the hook issues its P and Q
  allreduces from future callbacks run on Gloo's two worker threads, so with two buckets in
  flight the ranks issue the collectives in different orders (Gloo aborts on the size
  mismatch) or both threads block in those waits, the allreduces queued behind them (every
  rank idles, past any Gloo timeout).
  Their bytes are a ring allreduce's payload, 2(P-1)/P of what they reduce (PowerSGD's own
  count of the elements it reduces, the whole bucket before ``start_powerSGD_iter``).
"""

from __future__ import annotations

import functools

import math
from dataclasses import dataclass, field
from typing import Any

METHODS = ("optimizer", "hook", "ddp", "fp16", "powersgd")
TORCH_METHODS = ("ddp", "fp16", "powersgd", "hook")
"""Methods that wrap the model in DistributedDataParallel (and need torch's Gloo process group)."""
MOMENTUM = 0.9


@dataclass
class Hyper:
    """What every method of one run shares."""

    lr: float
    seed: int
    warmup_steps: int
    total_steps: int
    world: int
    steps_per_epoch: int = 1


@dataclass
class StepMethod:
    """A model ready to train one way: ``forward`` (DDP-wrapped or not), ``optimizer`` and how
    many bytes the last step sent (``last_bytes``)."""

    forward: Any
    model: Any
    optimizer: Any
    info: dict[str, Any] = field(default_factory=dict)
    _bytes: Any = None
    _close: Any = None
    _step: Any = None

    def step(self) -> None:
        """The optimizer's step (the sparsecoll hook's rows take ``CommHookState.sgd_step``)."""
        if self._step is None:
            self.optimizer.step()
        else:
            self._step()

    def last_bytes(self) -> float:
        return float(self._bytes())

    def close(self) -> None:
        if self._close is not None:
            self._close()


def ring_payload(values: float, element_bytes: int, world: int) -> float:
    """Bytes one rank sends in a ring allreduce of ``values`` elements: 2(P-1)/P of them."""
    return 2 * (world - 1) / world * values * element_bytes


def powersgd_start(total_steps: int) -> int:
    """torch's advice for ``start_powerSGD_iter``: 10% of the training steps; at least 2 (its minimum
    with error feedback or warm start)."""
    return max(2, total_steps // 10)


def one_bucket_mb(model: Any) -> int:
    """A DDP ``bucket_cap_mb`` that holds all of ``model``'s gradients in one bucket (given
    explicitly, it also caps DDP's first bucket, 1 MiB by default)."""
    size = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    return math.ceil(size / 2**20) + 1


def build(method: str, model: Any, sync: Any, config: dict[str, Any], hyper: Hyper) -> StepMethod:
    """``model`` (freshly built, the same on every rank) made ready to train by ``method``."""
    if method == "optimizer":
        return _optimizer(model, sync, config, hyper)
    if method in TORCH_METHODS:
        return _ddp(method, model, sync, config, hyper)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _optimizer(model: Any, sync: Any, config: dict[str, Any], hyper: Hyper) -> StepMethod:
    import torch

    from sparsecoll.torch import SparseCollOptimizer

    from sparsecoll.bench.train import density_schedule

    algorithm = config["algorithm"]
    inner = torch.optim.SGD(model.parameters(), lr=hyper.lr * config.get("lr_scale", 1.0), momentum=MOMENTUM)
    residual_dtype = getattr(torch, config["residual_dtype"]) if "residual_dtype" in config else None
    warmup_steps = (int(config["warmup_epochs"] * hyper.steps_per_epoch) if "warmup_epochs" in config
                    else hyper.warmup_steps)
    optimizer = SparseCollOptimizer(inner, sync, algorithm,
                                    density_schedule(config, hyper.steps_per_epoch) if algorithm != "dense" else 1.0,
                                    per_layer=config.get("per_layer", False),
                                    error_feedback=config.get("error_feedback"),
                                    memory_beta=config.get("memory_beta"),
                                    momentum_correction=config.get("momentum_correction", True),
                                    momentum_masking=config.get("momentum_masking", False),
                                    algorithm_options=config.get("options"),
                                    warmup_steps=warmup_steps if algorithm != "dense" else 0,
                                    seed=hyper.seed, residual_dtype=residual_dtype,
                                    dense_fp16=config.get("dense_fp16", False),
                                    quantize_bits=config.get("quantize_bits"),
                                    **config.get("optimizer_options", {}))
    info = {"error_feedback_used": bool(optimizer.compression.error_feedback),
            "memory_beta_used": optimizer.compression.filter_factor(),
            "momentum_correction_used": bool(optimizer.momentum_correction),
            "momentum_masking_used": optimizer.momentum_masking if optimizer.momentum_correction else None,
            "dense_fp16_used": optimizer.compression.dense_fp16,
            "quantize_bits_used": optimizer.compression.quantize_bits}
    return StepMethod(model, model, optimizer, info, lambda: optimizer.last_stats.bytes_sent)


def _ddp(method: str, model: Any, sync: Any, config: dict[str, Any], hyper: Hyper) -> StepMethod:
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel

    from sparsecoll.torch.ddp_hook import CommHookState, comm_hook

    # gradient_as_bucket_view: .grad is a view of DDP's bucket, so the reduced bucket need not be
    # copied back into every .grad (torch's advice for any comm hook; the same for every DDP row)
    # one bucket: PowerSGD's hook over Gloo (see README), and the sparsecoll hook's rows where
    # accuracy is measured, which compress each bucket on its own (PerBucketDensityWarning)
    one_bucket = method == "powersgd" or config.get("one_bucket", False)
    wrapped = DistributedDataParallel(model, gradient_as_bucket_view=True,
                                      **({"bucket_cap_mb": one_bucket_mb(model)} if one_bucket else {}))
    numel = sum(parameter.numel() for parameter in model.parameters())
    element = next(model.parameters()).element_size()
    info: dict[str, Any] = {}
    close = None
    sparse_step = False  # the sparsecoll hook's rows step plain SGD at the reduced gradient's k indices
    momentum = MOMENTUM
    if method == "ddp":
        sent = ring_payload(numel, element, hyper.world)
        last_bytes = lambda: sent  # noqa: E731
    elif method == "fp16":
        wrapped.register_comm_hook(None, default_hooks.fp16_compress_hook)
        sent = ring_payload(numel, 2, hyper.world)
        last_bytes = lambda: sent  # noqa: E731
    elif method == "powersgd":
        start = powersgd_start(hyper.total_steps)
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=int(config["rank"]),
                                            start_powerSGD_iter=start, use_error_feedback=True, warm_start=True,
                                            random_seed=hyper.seed)
        wrapped.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        info = {"start_powerSGD_iter": start, "warm_start": True, "use_error_feedback": True}
        last_bytes = _PowerSGDCount(state, numel, element, hyper.world)
    else:
        corrected = config.get("momentum_correction", True)
        state = CommHookState(sync, config["algorithm"], config["density"], momentum=MOMENTUM if corrected else 0.0,
                              warmup_steps=hyper.warmup_steps, seed=hyper.seed, module=wrapped,
                              error_feedback=config.get("error_feedback"), memory_beta=config.get("memory_beta"),
                              momentum_masking=config.get("momentum_masking", False),
                              dense_fp16=config.get("dense_fp16", False),
                              quantize_bits=config.get("quantize_bits"),
                              **config.get("hook_options", {}))
        wrapped.register_comm_hook(state, comm_hook)
        momentum = 0.0 if corrected else MOMENTUM  # with momentum correction the hook keeps it (DGC)
        info = {"error_feedback_used": bool(state.compression.error_feedback),
                "memory_beta_used": state.compression.filter_factor(), "momentum_correction_used": corrected,
                "momentum_masking_used": state.momentum_masking if corrected else None,
                "dense_fp16_used": state.compression.dense_fp16,
                "quantize_bits_used": state.compression.quantize_bits, "one_bucket": one_bucket}
        last_bytes = lambda: sum(stats.bytes_sent for stats in state.last_stats.values())  # noqa: E731
        close = state.close
        sparse_step = True
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=hyper.lr, momentum=momentum)
    step = functools.partial(_hook_step, state, optimizer, info) if sparse_step else None
    return StepMethod(wrapped, model, optimizer, info, last_bytes, close, step)


def _hook_step(state: Any, optimizer: Any, info: dict[str, Any]) -> None:
    """The sparsecoll hook's rows: plain SGD at the k indices (``CommHookState.sgd_step``); the
    row reports how many steps took that path."""
    state.sgd_step(optimizer)
    info["sparse_sgd_steps"] = state.sparse_steps


class _PowerSGDCount:
    """Bytes of PowerSGD's last step, from the element count its state keeps (it counts only
    compressed steps: before ``start_powerSGD_iter`` it reduces every element)."""

    def __init__(self, state: Any, numel: int, element: int, world: int) -> None:
        self.state, self.numel, self.element, self.world = state, numel, element, world
        self.counted = 0

    def __call__(self) -> float:
        total = self.state.total_numel_after_compression
        reduced, self.counted = total - self.counted, total
        return ring_payload(reduced or self.numel, self.element, self.world)
