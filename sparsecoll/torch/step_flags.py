"""What every rank must agree on before a step touches any state: an AMP overflow, a NaN/inf
gradient, a gradient of a parameter in no bucket.

:class:`StepFlags` gives :class:`~sparsecoll.torch.SparseCollOptimizer` (and its overlapped
steps) this rank's flags, read before the residuals or momentum are touched, and turns the flags
agreed over the ranks (one small allreduce, in the optimizer) into the same decision on every
rank: skip, raise, or step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sparsecoll.errors import InvalidArgumentError, NonFiniteGradientError
from sparsecoll.torch.error_feedback import squared_norm
from sparsecoll.torch.exchange import all_finite


class StepFlags:
    """The optimizer's flag logic; it reads the optimizer's ``param_groups``, ``buckets``,
    ``_bucketed``, ``clip_norm``, ``grad_scaler``, ``skip_nonfinite``, ``steps`` and ``sync``."""

    clip_squared_norm: float | None = None
    """The sum of squares of this step's gradients, read with the NaN/inf check (``clip_norm`` only)."""

    def _stray_parameter(self) -> str:
        """A parameter of the wrapped optimizer that has a gradient but no bucket ('' if none)."""
        for group_index, param_group in enumerate(self.param_groups):
            for position, param in enumerate(param_group["params"]):
                if param.grad is not None and id(param) not in self._bucketed:
                    return f"parameter {position} of param group {group_index} (shape {tuple(param.shape)})"
        return ""

    def _local_flags(self, stray: str) -> tuple[bool, bool, bool]:
        """This rank's (overflowed, nonfinite, strayed), after unscaling under AMP: whether AMP
        found an overflow, whether a bucket holds NaN/inf (one read, before anything touches the
        residuals or momentum), and whether a gradient has no bucket (``stray``). With
        ``clip_norm`` that read is the gradients' sum of squares (NaN or inf exactly when a value
        is: float32 squares stay finite in float64), kept in ``clip_squared_norm`` for clipping."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if grad_scale is not None:
            inverse = 1.0 / float(grad_scale)
            for bucket in self.buckets:
                bucket.gradient.mul_(inverse)
        overflowed = bool(found_inf is not None and float(found_inf) > 0)
        self.clip_squared_norm = None
        if overflowed:
            nonfinite = False
        elif self.clip_norm is not None:
            self.clip_squared_norm = squared_norm([bucket.gradient for bucket in self.buckets])
            nonfinite = not math.isfinite(self.clip_squared_norm)
        else:
            nonfinite = not all(all_finite(bucket.gradient) for bucket in self.buckets)
        return overflowed, nonfinite, bool(stray)

    def _skip_this_step(self, agreed: tuple[bool, bool, bool], stray: str = "") -> bool:
        """The flags agreed over the ranks (one allreduce): True on every rank alike when any rank
        overflowed (AMP) or, with ``skip_nonfinite``, holds a NaN/inf gradient;
        NonFiniteGradientError on every rank when one does and the step is not to be skipped;
        InvalidArgumentError on every rank when a rank has a gradient of a parameter in no bucket
        (``stray``). Nothing has touched the residuals or momentum then."""
        overflowed, nonfinite, strayed = agreed
        if strayed:
            raise self._stray_error(stray)
        if overflowed and self.grad_scaler is not None:
            mark_overflow(self.grad_scaler, self)
        if nonfinite and not overflowed and not self.skip_nonfinite:
            raise NonFiniteGradientError(
                f"a gradient held NaN or inf at step {self.steps} (on this rank or another); nothing was "
                "sent and the residuals are as they were, so the group and optimizer stay usable "
                "(skip_nonfinite=True skips such steps instead)", rank=self.sync.rank)
        return overflowed or nonfinite

    def _stray_error(self, stray: str) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"{stray or 'a parameter on another rank'} has a gradient but was not trainable "
            "(requires_grad=False) when the SparseCollOptimizer was built, so it is in no bucket and "
            "would step on this rank's gradient alone: build the SparseCollOptimizer after unfreezing "
            "(freezing later is fine: a bucketed parameter without a gradient counts as zero)", rank=self.sync.rank)


def mark_overflow(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Tell ``scaler`` that this step overflowed, so that its ``update()`` backs off as on the rank
    that did overflow. GradScaler has no public way to do this (torch 2.4-2.14): it reads the
    flags it recorded for the optimizer, so those are set; README lists this private surface."""
    try:
        record = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    except (AttributeError, KeyError, TypeError) as error:
        raise RuntimeError(f"grad_scaler: this torch's GradScaler keeps no per-optimizer overflow flags "
                           f"({type(error).__name__}: {error}); sparsecoll supports torch >=2.4,<2.15") from error
    for flag in record.values():
        flag.fill_(1.0)
