"""Named extension points: compressors and collectives that the optimizer and bench pick by string.

A *compressor* is a factory ``factory(**options) -> codec`` whose codec has ``encode(array)``
returning a payload and ``decode(payload)`` returning the dense array (see
``sparsecoll.compress``). A *collective* is ``async def fn(group, array, **options) ->
CollectiveResult`` written on ``Group.run`` (or on other collectives and point-to-point
calls). Register once at import time of your module::

    @sparsecoll.register_collective("my-allreduce")
    async def my_allreduce(group, array, **options): ...

    await group.collective("my-allreduce", grad)

Built-ins are registered as "module:attribute" strings and imported on first use, so
importing sparsecoll does not import Numba.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from sparsecoll.errors import InvalidArgumentError

_COMPRESSORS: dict[str, Any] = {
    "topk": "sparsecoll.compress.topk:TopKCodec",
    "threshold": "sparsecoll.compress.threshold:ThresholdCodec",
    "randomk": "sparsecoll.compress.randomk:RandomKCodec",
    "quantize": "sparsecoll.compress.quantize:QuantizeCodec",
    "sketch": "sparsecoll.compress.sketch:CountSketchCodec",
}
_COLLECTIVES: dict[str, Any] = {
    "dense": "sparsecoll.collectives.dense:allreduce",
    "allgather": "sparsecoll.collectives.sparse_allgather:sparse_allgather",
    "gtopk": "sparsecoll.collectives.gtopk:gtopk",
    "sketch": "sparsecoll.collectives.sketch:sketch_allreduce",
    "cltk": "sparsecoll.collectives.cltk:cltk",
    "oktopk": "sparsecoll.collectives.oktopk:oktopk",
    "lazy": "sparsecoll.collectives.lazy:lazy_allreduce",
    "quantized-broadcast": "sparsecoll.collectives.quantized:broadcast_parameters",
    "reduce": "sparsecoll.collectives.reduce:reduce_gradient",
}


def _resolve(table: dict[str, Any], kind: str, name: str) -> Any:
    try:
        entry = table[name]
    except KeyError:
        raise InvalidArgumentError(f"no {kind} named {name!r}; registered: {sorted(table)}") from None
    if isinstance(entry, str):
        module_name, _, attribute = entry.partition(":")
        entry = getattr(importlib.import_module(module_name), attribute)
        table[name] = entry
    return entry


def _register(table: dict[str, Any], kind: str, name: str, target: Any, replace: bool) -> Any:
    if not name or not isinstance(name, str):
        raise InvalidArgumentError(f"a {kind} needs a non-empty string name")
    if name in table and not replace:
        raise InvalidArgumentError(f"a {kind} named {name!r} is already registered (pass replace=True)")
    table[name] = target
    return target


def register_compressor(name: str, factory: Callable[..., Any] | None = None, *,
                        replace: bool = False) -> Any:
    """Register ``factory`` under ``name`` (usable as a decorator when ``factory`` is omitted)."""
    if factory is None:
        return lambda target: _register(_COMPRESSORS, "compressor", name, target, replace)
    return _register(_COMPRESSORS, "compressor", name, factory, replace)


def register_collective(name: str, function: Callable[..., Any] | None = None, *,
                        replace: bool = False) -> Any:
    """Register an async collective under ``name`` (usable as a decorator)."""
    if function is None:
        return lambda target: _register(_COLLECTIVES, "collective", name, target, replace)
    return _register(_COLLECTIVES, "collective", name, function, replace)


def compressor(name: str, **options: Any) -> Any:
    """A new codec from the compressor registered as ``name``."""
    return _resolve(_COMPRESSORS, "compressor", name)(**options)


def compressor_factory(name: str) -> Callable[..., Any]:
    """The factory registered as compressor ``name`` (to inspect or call with your options)."""
    return _resolve(_COMPRESSORS, "compressor", name)


def collective(name: str) -> Callable[..., Any]:
    """The collective function registered as ``name``."""
    return _resolve(_COLLECTIVES, "collective", name)


def compressors() -> list[str]:
    """Names of every registered compressor."""
    return sorted(_COMPRESSORS)


def collectives() -> list[str]:
    """Names of every registered collective."""
    return sorted(_COLLECTIVES)
