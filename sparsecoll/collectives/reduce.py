"""One entry point that names the algorithm, so the optimizer and the bench switch by a string.

``algorithm`` is "dense", "allgather", "gtopk", "sketch", "cltk", or the name of a collective
registered with :func:`sparsecoll.register_collective` (it receives the same keyword options
and may return a :class:`SparseResult` or a dense array). ``quantize_bits`` applies to
"allgather" and "gtopk"; ``lazy`` (a :class:`LazyState`) to "dense".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from sparsecoll import registry
from sparsecoll.call import CollectiveResult
from sparsecoll.collectives.cltk import cltk
from sparsecoll.collectives.dense import allreduce
from sparsecoll.collectives.gtopk import gtopk
from sparsecoll.collectives.lazy import LazyState, lazy_allreduce
from sparsecoll.collectives.sketch import sketch_allreduce
from sparsecoll.collectives.sparse_allgather import sparse_allgather
from sparsecoll.collectives.sparse_common import SparseResult, float_vector
from sparsecoll.errors import InvalidArgumentError

if TYPE_CHECKING:
    from sparsecoll.group import Group

BUILTIN = ("dense", "allgather", "gtopk", "sketch", "cltk")


async def reduce_gradient(group: Group, grad: np.ndarray, algorithm: str = "gtopk", *,
                          density: float | None = None, k: int | None = None,
                          quantize_bits: int | None = None, lazy: LazyState | None = None,
                          step: int = 0, seed: int = 0, timeout: float | None = None,
                          **options: Any) -> CollectiveResult:
    """Sum ``grad`` over the ranks with the named algorithm; value is a :class:`SparseResult`."""
    if quantize_bits is not None and algorithm not in ("allgather", "gtopk"):
        raise InvalidArgumentError(f"quantize_bits applies to 'allgather' and 'gtopk', not {algorithm!r}")
    if lazy is not None and algorithm != "dense":
        raise InvalidArgumentError(f"lazy aggregation applies to 'dense', not {algorithm!r}")
    sparse = dict(k=k, density=density, timeout=timeout)
    if algorithm == "dense":
        if lazy is not None:
            return await lazy_allreduce(group, grad, lazy, timeout=timeout)
        flat = float_vector(grad)
        total, stats = await allreduce(group, flat, timeout=timeout)
        return CollectiveResult(SparseResult(None, total, flat.size, None, flat), stats)
    if algorithm == "allgather":
        return await sparse_allgather(group, grad, quantize_bits=quantize_bits, seed=seed, step=step,
                                      **sparse, **options)
    if algorithm == "gtopk":
        return await gtopk(group, grad, quantize_bits=quantize_bits, seed=seed, step=step, **sparse, **options)
    if algorithm == "sketch":
        return await sketch_allreduce(group, grad, seed=seed, **sparse, **options)
    if algorithm == "cltk":
        return await cltk(group, grad, step=step, seed=seed, **sparse, **options)
    value, stats = await registry.collective(algorithm)(group, grad, density=density, k=k, step=step,
                                                       seed=seed, timeout=timeout, **options)
    if isinstance(value, SparseResult):
        return CollectiveResult(value, stats)
    flat = float_vector(grad)
    return CollectiveResult(SparseResult(None, np.asarray(value).reshape(-1), flat.size, None, flat), stats)
