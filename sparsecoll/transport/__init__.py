"""Transports: move frames between ranks. ``base`` is the interface, ``tcp`` the socket one,
``ucx`` the UCX one (ucxx: InfiniBand, shared memory, TCP; host and GPU buffers).

``TRANSPORTS`` maps a backend name (``init_group(backend=...)`` or SPARSECOLL_BACKEND) to the
module and class that implement it; modules are imported only when their backend is chosen,
so optional dependencies (ucxx) cost nothing to users of the others.
"""

from __future__ import annotations

import importlib

from sparsecoll.errors import InvalidArgumentError
from sparsecoll.transport.base import Transport

TRANSPORTS: dict[str, tuple[str, str]] = {
    "tcp": ("sparsecoll.transport.tcp", "TcpTransport"),
    "ucx": ("sparsecoll.transport.ucx", "UcxTransport"),
}


def transport_class(backend: str) -> type[Transport]:
    """The Transport subclass registered for ``backend``."""
    try:
        module_name, class_name = TRANSPORTS[backend]
    except KeyError:
        raise InvalidArgumentError(f"unknown backend {backend!r}; available: {sorted(TRANSPORTS)}") from None
    return getattr(importlib.import_module(module_name), class_name)


__all__ = ["TRANSPORTS", "Transport", "transport_class"]
