"""One entry point that names the algorithm, so the optimizer and the bench switch by a string.

``algorithm`` is "dense" (a dense ring allreduce), "allgather" (sparse top-k allgather: every
rank's top-k (index, value) pairs allgathered and summed, Aji & Heafield; not the dense
:meth:`Group.allgather`), "gtopk", "sketch", "cltk", "oktopk" (Li & Hoefler's O(k) sparse
allreduce; pass ``state=OkTopkState()``, one per gradient, to reuse its thresholds), the name of a collective registered with
:func:`sparsecoll.register_collective` (it receives the same keyword options and may return a
:class:`SparseResult` or a dense array), or the name of a compressor registered with
:func:`sparsecoll.register_compressor` (built with ``density``/``k``/``seed``
when its factory takes them, plus the keyword options; its payloads are allgathered, see
:mod:`sparsecoll.collectives.compressed`). Collective names win over compressor names.
``"auto"`` picks the builtin that the calibrated cost model prices fastest for this (P, d, k,
link) — rank 0's model decides for every rank (:mod:`sparsecoll.collectives.auto`; calibrate
with ``sparsecoll-bench calibrate``).

The options combine with the built-in algorithms as follows:

- ``quantize_bits`` (b in 1, 2, 4, 8; stochastic rounding, a float32 scale per 256 values)
  works with all six: "dense" becomes a QSGD-style quantized ring allreduce, "cltk" sends its
  k-value ring quantized, "sketch" both its sketch and its exact-values allreduces, and
  "allgather" and "gtopk" their sparse values, and "oktopk" the values of its split phase (its
  region sums travel exact).
- ``lazy`` (a :class:`LazyState`) works with "dense" (LAG; with ``quantize_bits``, LAQ) and
  "allgather" (a rank whose selection moved little asks the others to reuse its last one,
  with or without ``quantize_bits``). "gtopk", "sketch" and "cltk" refuse it: their merges,
  candidates or leader's indices change every round, so there is no stale per-rank
  contribution that the others could reuse (see ``LAZY_REFUSED``).
- Registered collectives and compressors take neither option.

``hierarchical`` (False by default, True, or "auto") runs "dense", "allgather", "gtopk" and
"cltk" in two levels on hosts with several ranks: reduce-scatter inside the host, the
algorithm between hosts on each shard, allgather inside the host
(:mod:`sparsecoll.collectives.hierarchical`). "auto" does so whenever there is more than one
host and a host holds more than one rank; True refuses what it cannot run two-level
(``quantize_bits``, ``lazy``, other algorithms). With one host, or one rank a host, both run
the flat algorithm. The first call that is not False exchanges the hosts (a collective).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from sparsecoll import registry
from sparsecoll.call import CollectiveResult
from sparsecoll.collectives.auto import choose_algorithm
from sparsecoll.collectives.cltk import cltk
from sparsecoll.collectives.compressed import compressed_allgather, make_codec
from sparsecoll.collectives.cost_bytes import TWO_LEVEL_ALGORITHMS
from sparsecoll.collectives.cost_model import ALGORITHMS
from sparsecoll.collectives.dense import allreduce
from sparsecoll.collectives.gtopk import gtopk
from sparsecoll.collectives.hierarchical import check_mode, hierarchical_reduce, use_hierarchical
from sparsecoll.collectives.lazy import LazyState, lazy_allreduce
from sparsecoll.collectives.oktopk import oktopk
from sparsecoll.collectives.oktopk_state import OkTopkState
from sparsecoll.collectives.quantized_ring import check_bits, quantized_allreduce
from sparsecoll.collectives.sketch import sketch_allreduce
from sparsecoll.collectives.sparse_allgather import sparse_allgather
from sparsecoll.collectives.sparse_common import SparseResult, float_vector, resolve_k
from sparsecoll.errors import InvalidArgumentError

if TYPE_CHECKING:
    from sparsecoll.group import Group

BUILTIN = ALGORITHMS
"""The built-in algorithms, the ones the cost model prices (one tuple, so the two cannot drift)."""
LAZY_REFUSED = {
    "gtopk": "each merge keeps the top k of the partners' sums, which change every round, so no "
             "rank has a contribution of its own that the others could reuse",
    "sketch": "the summed sketches pick new candidates every round, and a stale contribution has no "
              "values at them",
    "cltk": "the leader, and with it the indices every rank reduces at, changes every round, so a "
            "stale contribution holds values at the wrong indices",
    "oktopk": "its owners keep the entries of the round's summed regions above the global threshold, "
              "so a stale contribution has no place in the round's sums",
}
"""Why lazy aggregation does not compose with these algorithms."""
NOT_ALGORITHMS = {
    "lazy": "it is an option: pass lazy=LazyState(...) with 'dense' or 'allgather'",
    "quantized-broadcast": "it broadcasts parameters: call Group.collective('quantized-broadcast', ...)",
    "reduce": "it is reduce_gradient itself: name one of the algorithms",
}
"""Registry entries that are not gradient-reduction algorithms, refused as ``algorithm`` (each
would run something else: "reduce" would silently run gTop-k)."""


def check_algorithm_name(algorithm: str) -> None:
    """InvalidArgumentError for a name that is not a gradient-reduction algorithm."""
    if algorithm in NOT_ALGORITHMS:
        raise InvalidArgumentError(f"{algorithm!r} is not a gradient-reduction algorithm "
                                   f"({NOT_ALGORITHMS[algorithm]}); "
                                   f"choose from {list(BUILTIN)}, 'auto', or a collective or compressor you registered")


async def pick_algorithm(group: Group, grad: np.ndarray, *, density: float | None = None, k: int | None = None,
                         quantize_bits: int | None = None, lazy: bool = False, hierarchical: bool | str = False,
                         timeout: float | None = None) -> str:
    """The builtin that rank 0's cost model prices fastest for this call (``algorithm="auto"``),
    among those that take ``lazy``; the same on every rank (see :mod:`.auto`). Where the call
    will run in two levels (``hierarchical`` not False, several hosts of several ranks), the
    two-level algorithms are priced so; ``hierarchical=True`` picks only among them."""
    flat = float_vector(grad, on_device=True)  # its size and dtype only
    candidates = [name for name in BUILTIN if not (lazy and name in LAZY_REFUSED)]
    two_level = None
    if hierarchical is not False and quantize_bits is None and not lazy:
        table = (await group.topology.discover(timeout)).table
        if table.hierarchical_helps():
            two_level = (table.host_count, table.shard_count)
        if hierarchical is True:
            candidates = [name for name in candidates if name in TWO_LEVEL_ALGORITHMS]
    return await choose_algorithm(group, flat.size, resolve_k(flat.size, k, density), quantize_bits=quantize_bits,
                                  candidates=candidates, itemsize=flat.itemsize, two_level=two_level,
                                  timeout=timeout)


async def reduce_gradient(group: Group, grad: np.ndarray, algorithm: str = "gtopk", *,
                          density: float | None = None, k: int | None = None,
                          quantize_bits: int | None = None, lazy: LazyState | None = None,
                          step: int = 0, seed: int = 0, timeout: float | None = None,
                          hierarchical: bool | str = False, **options: Any) -> CollectiveResult:
    """Sum ``grad`` over the ranks with the named algorithm; value is a :class:`SparseResult`."""
    check_algorithm_name(algorithm)
    check_mode(hierarchical)
    # a two-level call's place in line is taken before its first wait (see topology.CallOrder)
    ticket = group.topology.order.ticket() if hierarchical is not False else None
    try:
        if algorithm == "auto":
            algorithm = await pick_algorithm(group, grad, density=density, k=k, quantize_bits=quantize_bits,
                                             lazy=lazy is not None, hierarchical=hierarchical, timeout=timeout)
        _check_options(algorithm, quantize_bits, lazy)
        if ticket is not None and await use_hierarchical(group, algorithm, hierarchical,
                                                         quantize_bits=quantize_bits, lazy=lazy, timeout=timeout):
            return await hierarchical_reduce(group, grad, algorithm, ticket=ticket, k=k, density=density,
                                             step=step, seed=seed, timeout=timeout, **options)
    finally:
        if ticket is not None:
            group.topology.order.passed(ticket)
    sparse = {"k": k, "density": density, "timeout": timeout}
    if algorithm != "oktopk" and isinstance(options.get("state"), OkTopkState):
        options.pop("state")  # "auto" chose another algorithm: Ok-Topk's memory waits for its turn
    if algorithm == "dense":
        if lazy is not None:
            return await lazy_allreduce(group, grad, lazy, quantize_bits=quantize_bits, seed=seed + 7919 * step,
                                        timeout=timeout)
        flat = float_vector(grad)
        if quantize_bits is not None:
            total, stats = await quantized_allreduce(group, flat, quantize_bits, seed=seed + 7919 * step,
                                                     timeout=timeout)
        else:
            total, stats = await allreduce(group, flat, timeout=timeout)
        return CollectiveResult(SparseResult(None, total, flat.size, None, flat), stats)
    if algorithm == "allgather":
        return await sparse_allgather(group, grad, quantize_bits=quantize_bits, lazy=lazy, seed=seed, step=step,
                                      **sparse, **options)
    if algorithm == "gtopk":
        return await gtopk(group, grad, quantize_bits=quantize_bits, seed=seed, step=step, **sparse, **options)
    if algorithm == "sketch":
        return await sketch_allreduce(group, grad, quantize_bits=quantize_bits, seed=seed, **sparse, **options)
    if algorithm == "oktopk":
        return await oktopk(group, grad, quantize_bits=quantize_bits, seed=seed, step=step, **sparse, **options)
    if algorithm == "cltk":
        return await cltk(group, grad, quantize_bits=quantize_bits, step=step, seed=seed, **sparse, **options)
    if algorithm not in registry.collectives() and algorithm in registry.compressors():
        codec = make_codec(registry.compressor_factory(algorithm), density, k, seed, options)
        return await compressed_allgather(group, grad, codec, name=algorithm, step=step, timeout=timeout)
    value, stats = await registry.collective(algorithm)(group, grad, density=density, k=k, step=step,
                                                       seed=seed, timeout=timeout, **options)
    if isinstance(value, SparseResult):
        return CollectiveResult(value, stats)
    flat = float_vector(grad)
    return CollectiveResult(SparseResult(None, np.asarray(value).reshape(-1), flat.size, None, flat), stats)


def _check_options(algorithm: str, quantize_bits: int | None, lazy: LazyState | None) -> None:
    """InvalidArgumentError, with the reason, for a combination that does not work."""
    if algorithm not in BUILTIN:
        if quantize_bits is not None or lazy is not None:
            raise InvalidArgumentError(f"quantize_bits and lazy apply to the built-in algorithms {BUILTIN}, "
                                       f"not to {algorithm!r}")
        return
    if quantize_bits is not None:
        check_bits(quantize_bits)
    if lazy is not None and algorithm in LAZY_REFUSED:
        raise InvalidArgumentError(f"lazy aggregation does not compose with {algorithm!r}: "
                                   f"{LAZY_REFUSED[algorithm]}; use 'dense' or 'allgather'")
