"""``algorithm="auto"``: every rank picks the same algorithm, the one rank 0's cost model prices lowest.

Ranks may hold different cost models (or none), and a split choice would deadlock the next
collective, so rank 0's model decides: on a group's first :func:`choose_algorithm` call rank 0
broadcasts its model's parameters (a few float64) and every rank caches them for that group.
Later calls are local and deterministic (the same numbers through the same code), so they cost
no traffic and may run per bucket and step. The first call on a group is therefore a
collective: every rank must make it, in the same order as its other collectives.

Without a calibration file (``sparsecoll-bench calibrate``) rank 0 says so once, in a warning,
and the group calibrates itself online on that first call instead of trusting the defaults'
10 Gbit/s guess: every rank times a few 8-byte and 1 MiB allreduces and a top-k over 1M
elements, and the slowest rank's times give α, β and the selection cost (the other kernel
costs keep their defaults). That adds :data:`ONLINE_PROBE_CALLS` collectives to the first call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import warnings
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from sparsecoll.collectives.cost_model import (
    ALGORITHMS,
    DEFAULT_MODEL,
    PARAMETERS,
    CostModel,
    default_path,
)
from sparsecoll.errors import InvalidArgumentError

if TYPE_CHECKING:
    from sparsecoll.group import Group

_SHARED: weakref.WeakKeyDictionary[Group, CostModel] = weakref.WeakKeyDictionary()
_PENDING: weakref.WeakKeyDictionary[Group, asyncio.Future] = weakref.WeakKeyDictionary()
_WARNED = False

PROBE_SMALL = 2
"""float32 values of the latency probe: 8 bytes."""
PROBE_LARGE = 1 << 18
"""float32 values of the bandwidth probe: 1 MiB."""
PROBE_SELECT = 1 << 20
"""Elements of the top-k timing."""
PROBE_REPEATS = 3
ONLINE_PROBE_CALLS = 2 * (PROBE_REPEATS + 1) + 4
"""Collectives the online calibration adds: timed allreduces (one untimed each), three barriers,
and the allreduce that shares the slowest rank's times."""


async def shared_cost_model(group: Group, model: CostModel | None = None, *, refresh: bool = False,
                            timeout: float | None = None) -> CostModel:
    """Rank 0's cost model on every rank: broadcast on the group's first call (or with
    ``refresh=True``, which every rank must pass together), cached for the group afterwards.

    ``model`` is this rank's offer; only rank 0's counts, and rank 0 without one loads the
    calibration file (:func:`~sparsecoll.collectives.cost_model.default_path`), else the group
    calibrates online (see the module docstring).
    If rank 0 cannot load its file, every rank raises InvalidArgumentError (none hangs).
    """
    cached = _SHARED.get(group)
    if cached is not None and not refresh:
        return cached
    pending = _PENDING.get(group)
    if pending is not None:  # a concurrent first call is sharing it: one broadcast, not two
        return await asyncio.shield(pending)
    future = _PENDING[group] = asyncio.get_running_loop().create_future()
    try:
        shared = await _broadcast_model(group, model, timeout)
    except BaseException as error:
        future.set_exception(error if isinstance(error, Exception) else InvalidArgumentError(
            "sharing the cost model was cancelled", rank=group.rank))
        future.exception()  # retrieved here, so an unawaited failure is not reported twice
        raise
    finally:
        del _PENDING[group]
    future.set_result(shared)
    return shared


async def _broadcast_model(group: Group, model: CostModel | None, timeout: float | None) -> CostModel:
    """Rank 0's model (or the NaNs of its failure) through one broadcast, checked on every rank;
    its last value says whether rank 0 had none, and the group then calibrates online."""
    parameters = np.full(len(PARAMETERS) + 1, np.nan)
    failure: InvalidArgumentError | None = None
    if group.rank == 0:
        try:
            offer, online = _rank_zero_offer(model)
            parameters = np.append(offer.to_array(), float(online))
        except InvalidArgumentError as error:
            failure = error  # broadcast the NaNs anyway, so the other ranks learn it too
    parameters, _ = await group.broadcast(parameters, root=0, timeout=timeout)
    if failure is not None:
        raise failure
    if np.isnan(parameters).any():
        raise InvalidArgumentError("rank 0 could not load its cost model", rank=group.rank, peer=0)
    shared = CostModel.from_array(parameters[:-1], link="rank 0's cost model")  # identical on every rank
    if parameters[-1]:
        shared = await calibrate_online(group, shared, timeout)
    _SHARED[group] = shared
    return shared


def _rank_zero_offer(model: CostModel | None) -> tuple[CostModel, bool]:
    """The model rank 0 offers, and whether it is only the defaults (no file): then say so once."""
    global _WARNED
    if model is not None:
        return model, False
    path = default_path()
    if path.exists():
        return CostModel.load(path), False
    if not _WARNED:
        _WARNED = True
        warnings.warn(f"algorithm='auto': no cost model at {path}; calibrating online from this group's first "
                      "call (latency, bandwidth, top-k cost). Run `sparsecoll-bench calibrate` on these hosts "
                      "for the full model.", RuntimeWarning, stacklevel=4)
    return DEFAULT_MODEL, True


async def calibrate_online(group: Group, base: CostModel, timeout: float | None = None) -> CostModel:
    """``base`` with α, β and the selection cost measured on this group (a collective).

    1. Every rank times :data:`PROBE_REPEATS` 8-byte allreduces (recursive doubling: α per
       message on the critical path) and as many 1 MiB ring allreduces (β), each after an
       untimed call.
    2. After a barrier, every rank times a top-k over :data:`PROBE_SELECT` elements at once,
       as ranks select in a step (sharing cores where they do); then, between two barriers,
       rank 0 times it alone, as CLT-k's leader selects.
    3. One allreduce takes the slowest rank's medians, so every rank fits the same model, by
       inverting the model's own formulas as ``sparsecoll-bench calibrate`` does.
    """
    from sparsecoll import kernels

    small = await _median_allreduce(group, np.zeros(PROBE_SMALL, np.float32), timeout)
    large = await _median_allreduce(group, np.zeros(PROBE_LARGE, np.float32), timeout)
    await group.barrier(timeout=timeout)
    vector = np.random.default_rng(group.rank).standard_normal(PROBE_SELECT).astype(np.float32)
    k = max(1, PROBE_SELECT // 1000)
    kernels.topk(vector, k, method="fast")  # compiled or loaded before timing
    together = _median_seconds(lambda: kernels.topk(vector, k, method="fast"))
    await group.barrier(timeout=timeout)  # rank 0 selects alone, as CLT-k's leader does
    alone = _median_seconds(lambda: kernels.topk(vector, k, method="fast")) if group.rank == 0 else 0.0
    await group.barrier(timeout=timeout)
    slowest, _ = await group.allreduce(np.array([small, large, together, alone]), op="max", timeout=timeout)
    small, large, select, lone = (float(value) for value in slowest)
    messages = dataclasses.replace(base, alpha=1.0, beta=0.0, reduce_per_element=0.0)
    alpha = small / max(messages.doubling_allreduce(group.size, PROBE_SMALL), 1.0)
    overhead = dataclasses.replace(base, alpha=alpha, beta=0.0).ring_allreduce(group.size, PROBE_LARGE)
    wire = dataclasses.replace(base, alpha=0.0, beta=1.0, reduce_per_element=0.0).ring_allreduce(group.size,
                                                                                                   PROBE_LARGE)
    beta = max(large - overhead, 0.1 * large) / wire if wire else base.beta  # noise must not make links free
    return dataclasses.replace(base, alpha=alpha, beta=beta, select_per_element=select / PROBE_SELECT,
                               select_fixed=0.0, lone_select_ratio=min(1.0, lone / select) if select > 0 else 1.0,
                               link="measured online by algorithm='auto'")


def _median_seconds(work) -> float:
    seconds = []
    for _ in range(PROBE_REPEATS):
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))


async def _median_allreduce(group: Group, array: np.ndarray, timeout: float | None) -> float:
    out = np.empty_like(array)
    seconds = []
    for index in range(PROBE_REPEATS + 1):
        started = time.perf_counter()
        await group.allreduce(array, out=out, timeout=timeout)
        if index:
            seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))


async def choose_algorithm(group: Group, size: int, k: int, *, quantize_bits: int | None = None,
                           model: CostModel | None = None, candidates: Sequence[str] = ALGORITHMS,
                           itemsize: int = 4, two_level: tuple[int, int] | None = None,
                           timeout: float | None = None) -> str:
    """The builtin algorithm predicted fastest for a ``size``-element gradient sending ``k``
    elements on this group (values of ``itemsize`` bytes); the same name on every rank (see the
    module docstring). With ``two_level`` = (hosts, ranks a host), the algorithms that will run
    in two levels are priced so (:meth:`CostModel.price`).

    ``candidates`` and the arguments must be the same on every rank (a flat gradient's size and
    k are). The first call on a group is collective: it shares rank 0's model.
    """
    shared = await shared_cost_model(group, model, timeout=timeout)
    return shared.choose(group.size, size, k, candidates, quantize_bits, itemsize=itemsize, two_level=two_level)
