"""Ranks that share a machine's cores: the cost model's compute contention.

:class:`~sparsecoll.collectives.cost_model.CostModel` prices local work as if every rank had a
core (or GPU) of its own, which is the default prediction and what a cluster gives. When R ranks
share C < R cores, as the P ranks of ``sparsecoll-bench sparse`` share this repository's 2-core
VM, each rank gets C/R of a core: work that every rank does at once (selection, merges, sketches,
adds) takes R/C times as long, and so does the CPU each message costs its ranks (system calls,
the event loop, copying every byte in and out), because every rank of a round has to be woken and
run before the round ends. :meth:`SharedCores.apply` turns a model of one rank on one core into
the model of that machine, so every formula of the cost model (flat and two-level) prices it
unchanged:

1. ``share = max(1, R/C)``: how many ranks a core serves.
2. Local costs (per element, per pair, the fixed selection cost) times ``share``; CLT-k's leader
   selects while the others wait, on all C cores (the kernels are parallel): ``1/(share*C)`` of
   everyone's selection.
3. Per message ``alpha + share * message_cpu``, per byte ``beta + share * byte_cpu``: the link's
   own latency and bandwidth plus a rank's CPU for each message and byte, served at 1/share.
4. A chain's hop (CLT-k's index broadcast) runs while the other ranks wait for it: only its two
   ranks share the cores, so it is priced at ``max(1, 2/C)`` instead of ``share``.

``message_cpu`` and ``byte_cpu`` are fitted (:func:`fit_message_cpu`) on measured calls, whose
local costs come from a one-core calibration
(:func:`sparsecoll.bench.calibrate.calibrate_one_core`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from sparsecoll.collectives.cost_model import CostModel
from sparsecoll.errors import InvalidArgumentError

MESSAGE_CPU = 72e-6
BYTE_CPU = 6.67e-9
"""A rank's CPU a message and a byte cost on this repository's 2-core VM over its emulated
1 Gbit/s links (TCP through network namespaces), as :func:`fit_message_cpu` fits them to
``docs/bench/oktopk/p2-4-8-1gbit.json`` (allgather, gTop-k, CLT-k, Ok-Topk at P = 2, 4, 8, d = 25M,
0.1%) with the local costs of ``docs/bench/oktopk/one-core-costs.json``, the link at 1 Gbit/s and
the default 50 µs a message. Checked, not fitted, on P = 16 and 32 (``p16-1gbit.json``,
``p32-1gbit.json``); ``tests/collectives/test_cost_contention.py`` re-fits and compares."""

LOCAL_COSTS = ("select_per_element", "select_fixed", "sketch_per_element", "reduce_per_element",
               "merge_per_pair", "quantize_per_element")
"""The cost model's parameters that are a rank's compute (scaled by the share of a core)."""


@dataclass(frozen=True)
class SharedCores:
    """``ranks`` ranks running on the same ``cores`` cores, each message costing a rank
    ``message_cpu`` seconds and each byte ``byte_cpu`` seconds of CPU (see the module docstring)."""

    ranks: int
    cores: int
    message_cpu: float = MESSAGE_CPU
    byte_cpu: float = BYTE_CPU

    def __post_init__(self) -> None:
        for name in ("ranks", "cores"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"shared cores: {name} must be an int >= 1, not {value!r}")
        for name in ("message_cpu", "byte_cpu"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise InvalidArgumentError(f"shared cores: {name} must be a finite number >= 0, not {value!r}")

    @property
    def share(self) -> float:
        """Ranks a core serves: R/C, at least 1 (a rank never runs on more than its kernels use)."""
        return max(1.0, self.ranks / self.cores)

    def apply(self, model: CostModel) -> SharedCoresModel:
        """``model`` (one rank on a core of its own, its link's α and β) on these shared cores."""
        share, pair = self.share, max(1.0, 2 / self.cores)
        local = {name: getattr(model, name) * share for name in LOCAL_COSTS}
        fields = {field.name: getattr(model, field.name) for field in dataclasses.fields(CostModel)}
        fields.update(local, lone_select_ratio=min(1.0, 1.0 / (share * self.cores)),
                      alpha=model.alpha + share * self.message_cpu, beta=model.beta + share * self.byte_cpu,
                      link=f"{model.link}; {self.ranks} ranks on {self.cores} cores")
        return SharedCoresModel(**fields, relay_alpha=model.alpha + pair * self.message_cpu,
                                relay_beta=model.beta + pair * self.byte_cpu)


@dataclass(frozen=True)
class SharedCoresModel(CostModel):
    """A cost model on shared cores (:meth:`SharedCores.apply`): its α and β are those of a
    round in which every rank runs; ``relay_alpha`` and ``relay_beta`` those of a chain's hop,
    in which two do."""

    relay_alpha: float = 0.0
    relay_beta: float = 0.0

    def chain_broadcast(self, ranks: int, nbytes: int) -> float:
        """Segments pipelined along P-1 hops, each hop's two ranks alone on the cores."""
        return CostModel(alpha=self.relay_alpha, beta=self.relay_beta).chain_broadcast(ranks, nbytes)


@dataclass(frozen=True)
class MeasuredCall:
    """One measured call: ``algorithm`` on ``ranks`` ranks, all on one machine of ``cores``
    cores, ``size`` elements of which ``k`` are sent, taking ``seconds``."""

    algorithm: str
    ranks: int
    size: int
    k: int
    seconds: float
    cores: int


def _terms(model: CostModel, call: MeasuredCall) -> tuple[float, float, float]:
    """(seconds without any message CPU, seconds a unit of message_cpu adds, seconds a unit of
    byte_cpu adds) of ``call`` under ``model``: the prediction is linear in both CPU terms."""
    def predict(message_cpu: float, byte_cpu: float) -> float:
        cores = SharedCores(call.ranks, call.cores, message_cpu, byte_cpu)
        return cores.apply(model).predict(call.algorithm, call.ranks, call.size, call.k)

    base = predict(0.0, 0.0)
    return base, predict(1.0, 0.0) - base, predict(0.0, 1.0) - base


def fit_message_cpu(model: CostModel, calls: Iterable[MeasuredCall]) -> tuple[float, float]:
    """(message_cpu, byte_cpu) >= 0 that minimise the squared relative error of the predictions
    for ``calls`` (non-negative least squares on the prediction's two linear terms)."""
    from scipy.optimize import nnls

    rows, targets = [], []
    for call in calls:
        base, per_message, per_byte = _terms(model, call)
        rows.append([per_message / call.seconds, per_byte / call.seconds])
        targets.append(1.0 - base / call.seconds)
    if len(rows) < 2:
        raise InvalidArgumentError("fitting the message CPU needs at least 2 measured calls")
    design, target = np.array(rows), np.array(targets)
    both = np.linalg.lstsq(design, target, rcond=None)[0]
    if (both >= 0).all():
        return float(both[0]), float(both[1])
    candidates = []
    for column in (0, 1):
        alone = np.zeros(2)
        alone[column] = max(0.0, float(np.linalg.lstsq(design[:, [column]], target, rcond=None)[0][0]))
        candidates.append((float(np.sum((design @ alone - target) ** 2)), alone))
    best = min(candidates, key=lambda item: item[0])[1]
    return float(best[0]), float(best[1])


def predict_call(model: CostModel, call: MeasuredCall, message_cpu: float, byte_cpu: float) -> float:
    """Seconds the model predicts for ``call`` on its machine's shared cores."""
    cores = SharedCores(call.ranks, call.cores, message_cpu, byte_cpu)
    return cores.apply(model).predict(call.algorithm, call.ranks, call.size, call.k)
