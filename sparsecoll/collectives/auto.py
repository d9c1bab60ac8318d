"""``algorithm="auto"``: every rank picks the same algorithm, the one rank 0's cost model prices lowest.

Ranks may hold different cost models (or none), and a split choice would deadlock the next
collective, so rank 0's model decides: on a group's first :func:`choose_algorithm` call rank 0
broadcasts its model's parameters (a few float64) and every rank caches them for that group.
Later calls are local and deterministic (the same numbers through the same code), so they cost
no traffic and may run per bucket and step. The first call on a group is therefore a
collective: every rank must make it, in the same order as its other collectives.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from sparsecoll.collectives.cost_model import (
    ALGORITHMS,
    PARAMETERS,
    CostModel,
    load_default,
)
from sparsecoll.errors import InvalidArgumentError

if TYPE_CHECKING:
    from sparsecoll.group import Group

_SHARED: weakref.WeakKeyDictionary[Group, CostModel] = weakref.WeakKeyDictionary()
_PENDING: weakref.WeakKeyDictionary[Group, asyncio.Future] = weakref.WeakKeyDictionary()


async def shared_cost_model(group: Group, model: CostModel | None = None, *, refresh: bool = False,
                            timeout: float | None = None) -> CostModel:
    """Rank 0's cost model on every rank: broadcast on the group's first call (or with
    ``refresh=True``, which every rank must pass together), cached for the group afterwards.

    ``model`` is this rank's offer; only rank 0's counts, and rank 0 without one loads
    :func:`~sparsecoll.collectives.cost_model.load_default` (the calibration file or defaults).
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
    """Rank 0's model (or the NaNs of its failure) through one broadcast, checked on every rank."""
    parameters = np.full(len(PARAMETERS), np.nan)
    failure: InvalidArgumentError | None = None
    if group.rank == 0:
        try:
            offer = model if model is not None else load_default()
            parameters = offer.to_array()
        except InvalidArgumentError as error:
            failure = error  # broadcast the NaNs anyway, so the other ranks learn it too
    parameters, _ = await group.broadcast(parameters, root=0, timeout=timeout)
    if failure is not None:
        raise failure
    if np.isnan(parameters).any():
        raise InvalidArgumentError("rank 0 could not load its cost model", rank=group.rank, peer=0)
    shared = CostModel.from_array(parameters, link="rank 0's cost model")  # identical on every rank
    _SHARED[group] = shared
    return shared


async def choose_algorithm(group: Group, size: int, k: int, *, quantize_bits: int | None = None,
                           model: CostModel | None = None, candidates: Sequence[str] = ALGORITHMS,
                           itemsize: int = 4, timeout: float | None = None) -> str:
    """The builtin algorithm predicted fastest for a ``size``-element gradient sending ``k``
    elements on this group (values of ``itemsize`` bytes); the same name on every rank (see the
    module docstring).

    ``candidates`` and the arguments must be the same on every rank (a flat gradient's size and
    k are). The first call on a group is collective: it shares rank 0's model.
    """
    shared = await shared_cost_model(group, model, timeout=timeout)
    return shared.choose(group.size, size, k, candidates, quantize_bits, itemsize=itemsize)
