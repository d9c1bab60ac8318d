"""Density schedules: how much of the gradient to send at each step, decided alike on every rank.

A fixed density spends the same bytes in every phase of training. Accordion (Agarwal et al.
2021, "Adaptive Gradient Communication via Critical Learning Regime Identification") sends
more while the gradient norm changes fast ("critical regimes": early training, and after a
learning-rate decay) and less elsewhere, because a model compressed hard in a critical regime
loses accuracy that later training does not win back.

Give a schedule as ``density=`` to :class:`~sparsecoll.torch.SparseCollOptimizer` (or to
:class:`~sparsecoll.torch.CommHookState`)::

    opt = SparseCollOptimizer(sgd, group, "gtopk", density=Accordion(0.001, critical_density=0.01,
                                                                      interval=steps_per_epoch))

Every rank must use the same density at each step (the collectives check it): a schedule only
decides from values agreed by a collective (see :meth:`DensitySchedule.density_for`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from sparsecoll.sync import SyncGroup

Agree = Callable[[np.ndarray], np.ndarray]
"""Maps this rank's float64 array to the mean of every rank's, the same bits on every rank."""


def mean_over(sync: SyncGroup) -> Agree:
    """An :data:`Agree` over ``sync``: one small allreduce. Recursive doubling adds the same two
    partial sums on both partners of each round (IEEE addition commutes), so every rank gets the
    same bits."""

    def agree(values: np.ndarray) -> np.ndarray:
        total, _ = sync.allreduce(np.ascontiguousarray(values, np.float64), op="mean")
        return np.asarray(total, np.float64)

    return agree


class DensitySchedule(ABC):
    """Decides the density of every step; one instance per optimizer (or DDP hook state).

    The caller, on every rank and at every step,

    1. asks :meth:`density_for` for the step's density (a collective at some steps: every rank
       calls it at the same steps, in the same order as its other collectives);
    2. shows the schedule this rank's gradient buffers with :meth:`observe`.
    """

    @property
    @abstractmethod
    def sparsest(self) -> float:
        """The lowest density the schedule uses (checked like a fixed ``density``)."""

    @abstractmethod
    def density_for(self, step: int, agree: Agree) -> float:
        """The density of ``step``, the same on every rank."""

    def observe(self, key: int, buffer: torch.Tensor, scale: float = 1.0) -> None:
        """This rank's gradient of buffer ``key`` at the current step: ``buffer / scale`` (the DDP
        hook's buffers under AMP hold it times the loss scale; default: unused)."""

    def for_step(self, step: int, buffers: Sequence[torch.Tensor], sync: SyncGroup) -> float:
        """Steps 1 and 2 for an optimizer that holds all its buffers at once."""
        density = self.density_for(step, mean_over(sync))
        for key, buffer in enumerate(buffers):
            self.observe(key, buffer)
        return density

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs (this rank's: save it with the optimizer's per-rank state)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def critical_regime(previous_norm: float, norm: float, eta: float) -> bool:
    """Accordion's test: the norm changed by at least ``eta`` of the previous one.

    A previous norm of zero counts as critical (any change is infinitely fast), as in the
    paper's code.
    """
    if previous_norm == 0.0:
        return True
    return abs(previous_norm - norm) / previous_norm >= eta


class Accordion(DensitySchedule):
    """Accordion's critical-regime detection (Agarwal et al. 2021, their ``auto_scale_topk``).

    ``density`` is sent outside critical regimes, ``critical_density`` (denser; 1.0 is a dense
    allreduce) inside them. Every ``interval`` steps (the paper uses an epoch):

    1. each rank takes the norm of its gradients summed over the interval that just ended
       (the paper's accumulated gradient);
    2. the ranks agree on the mean of those norms (one 8-byte allreduce an interval: local
       norms differ between ranks, and ranks that chose different densities would fail);
    3. the next interval is critical when the agreed norm changed by at least ``eta`` of the
       previous interval's, :func:`critical_regime`; the first interval, with nothing to compare,
       is critical when ``start_critical`` (the paper's code starts there). The first interval
       after a switch is not compared, only kept as the new reference (see below).

    Unlike the paper's code, an interval is compared only with one sent at the same density.
    The norm of a summed gradient depends on how far the parameters moved while it was summed:
    at 0.1% they barely move, the gradients stay aligned and their sum grows. Compared across a
    switch, that reads as a critical regime: with ``critical_density=1.0`` on the MNIST MLP
    (4 ranks, 0.1%) the paper's rule went back to dense after one sparse epoch and stayed dense
    (9.1 MB a step against dense's 9.8).

    The sums take one float32 copy of the gradient (a rank's memory grows by the model's size).
    ``history`` keeps ``(step, agreed norm, critical)`` of every decision.
    """

    def __init__(self, density: float, *, critical_density: float = 0.01, interval: int,
                 eta: float = 0.5, start_critical: bool = True) -> None:
        if not 0.0 < density <= 1.0 or not 0.0 < critical_density <= 1.0:
            raise ValueError(f"densities must be in (0, 1], got density={density}, "
                             f"critical_density={critical_density}")
        if critical_density < density:
            raise ValueError(f"critical_density ({critical_density}) must be at least density ({density}): "
                             "critical regimes are where Accordion sends more")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a whole number of steps >= 1, got {interval!r}")
        if not eta > 0.0 or not math.isfinite(eta):
            raise ValueError(f"eta must be a positive relative change (the paper's 0.5), got {eta}")
        self.density = float(density)
        self.critical_density = float(critical_density)
        self.interval = interval
        self.eta = float(eta)
        self.critical = bool(start_critical)
        """Whether the current interval is a critical regime."""
        self.previous_norm: float | None = None
        """The agreed norm of the last interval that ended."""
        self.history: list[tuple[int, float, bool]] = []
        self.switched = False
        """Whether the interval now running is the first at its density (its norm is not compared)."""
        self._sums: dict[int, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (f"Accordion({self.density}, critical_density={self.critical_density}, interval={self.interval}, "
                f"eta={self.eta})")

    @property
    def sparsest(self) -> float:
        return self.density

    def density_for(self, step: int, agree: Agree) -> float:
        """Steps 1-3 at the first step of each interval after the first, then the density."""
        if step > 0 and step % self.interval == 0 and self._sums:
            local = math.sqrt(sum(float(torch.sum(total.double() ** 2)) for total in self._sums.values()))
            self.record(step, float(agree(np.array([local]))[0]))
            for total in self._sums.values():
                total.zero_()
        return self.critical_density if self.critical else self.density

    def record(self, step: int, norm: float) -> bool:
        """Step 3 with the agreed ``norm`` of the interval ending before ``step``; the decision."""
        if self.previous_norm is not None and not self.switched:
            critical = critical_regime(self.previous_norm, norm, self.eta)
            self.switched, self.critical = critical != self.critical, critical
        else:
            self.switched = False
        self.previous_norm = norm
        self.history.append((step, norm, self.critical))
        return self.critical

    def observe(self, key: int, buffer: torch.Tensor, scale: float = 1.0) -> None:
        """Add this step's gradient (``buffer`` divided by ``scale``) to the interval's sum (a buffer
        that changed size starts afresh)."""
        total = self._sums.get(key)
        if total is None or total.shape != buffer.shape:
            total = self._sums[key] = torch.zeros_like(buffer, dtype=torch.promote_types(buffer.dtype,
                                                                                          torch.float32))
        total.add_(buffer.detach(), alpha=1.0 / scale)

    def state_dict(self) -> dict[str, Any]:
        return {"critical": self.critical, "switched": self.switched, "previous_norm": self.previous_norm,
                "history": list(self.history),
                "sums": {key: total.clone() for key, total in self._sums.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.critical = bool(state["critical"])
        self.switched = bool(state["switched"])
        self.previous_norm = None if state["previous_norm"] is None else float(state["previous_norm"])
        self.history = [(int(step), float(norm), bool(critical)) for step, norm, critical in state["history"]]
        self._sums = {int(key): total.clone() for key, total in state["sums"].items()}
