"""Transports: move frames between ranks. ``base`` is the interface, ``tcp`` the socket one."""

from sparsecoll.transport.base import Transport
from sparsecoll.transport.tcp import TcpTransport

__all__ = ["Transport", "TcpTransport"]
