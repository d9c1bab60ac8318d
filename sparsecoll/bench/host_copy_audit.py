"""An independent count of copies between device and host memory, for the GPU check.

The library counts its own staging copies (``sparsecoll.transport.device.host_copies`` where
that exists); this audit counts at the array libraries' copy calls instead, so a copy that the
library makes without counting it (a ``.cpu()`` in the torch layer, a Numba ``copy_to_host``)
is seen too. While :class:`HostCopyAudit` is active it wraps, for every thread of the process:

- ``torch.Tensor.cpu``, ``.to`` and ``.copy_`` when they move data between a CUDA device and the host;
- Numba's ``DeviceNDArray.copy_to_host`` / ``copy_to_device`` (``numba.cuda.to_device`` and a
  kernel launch on host arrays copy through them);
- ``cupy.asnumpy`` and ``cupy.asarray`` of a numpy array (``cupy.ndarray.get``/``set`` are
  methods of a compiled type and cannot be wrapped: copies made through them are not seen).

A copy of at least ``large_bytes`` counts as d-sized (the check sets it to a tenth of the
model's parameter bytes: a k-sized exchange at 0.1% is a hundred times smaller).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEVICE_TO_HOST, HOST_TO_DEVICE = "device-to-host", "host-to-device"


@dataclass
class CopyTally:
    """Copies seen: how many, their bytes, and how many of them were d-sized, by direction."""

    count: dict[str, int] = field(default_factory=lambda: {DEVICE_TO_HOST: 0, HOST_TO_DEVICE: 0})
    bytes: dict[str, int] = field(default_factory=lambda: {DEVICE_TO_HOST: 0, HOST_TO_DEVICE: 0})
    large: dict[str, int] = field(default_factory=lambda: {DEVICE_TO_HOST: 0, HOST_TO_DEVICE: 0})
    largest: int = 0


def library_copies() -> tuple[Callable[[], Any], Callable[[], None]] | None:
    """``(host_copies, reset_host_copies)``, the library's own tally of its staging copies, or
    None in a tree whose transport layer does not keep one."""
    from sparsecoll.transport import device

    functions = getattr(device, "host_copies", None), getattr(device, "reset_host_copies", None)
    return None if None in functions else functions


class HostCopyAudit:
    """A context manager that wraps the copy calls of the module docstring and tallies them."""

    def __init__(self, large_bytes: int) -> None:
        if large_bytes <= 0:
            raise ValueError(f"large_bytes must be positive, got {large_bytes}")
        self.large_bytes = large_bytes
        self.tally = CopyTally()
        self._lock = threading.Lock()
        self._restore: list[tuple[Any, str, Any]] = []

    def record(self, direction: str, nbytes: int) -> None:
        """Count one copy of ``nbytes`` bytes in ``direction``."""
        with self._lock:
            self.tally.count[direction] += 1
            self.tally.bytes[direction] += nbytes
            self.tally.large[direction] += nbytes >= self.large_bytes
            self.tally.largest = max(self.tally.largest, nbytes)

    def __enter__(self) -> HostCopyAudit:
        self._wrap_torch()
        self._wrap_numba()
        self._wrap_cupy()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for owner, name, original in reversed(self._restore):
            if original is None:
                delattr(owner, name)  # it was inherited: the base class's attribute shows again
            else:
                setattr(owner, name, original)
        self._restore.clear()

    def _wrap(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        original = getattr(owner, name)
        self._restore.append((owner, name, vars(owner).get(name) if isinstance(owner, type) else original))
        setattr(owner, name, functools.wraps(original)(make(original)))

    def _wrap_torch(self) -> None:
        try:
            import torch
        except ImportError:
            return

        def moved(source: Any, result: Any) -> None:
            if isinstance(result, torch.Tensor) and source.device.type != result.device.type:
                self.record(DEVICE_TO_HOST if source.is_cuda else HOST_TO_DEVICE, result.nbytes)

        def cpu(original: Any) -> Any:
            def wrapper(tensor: Any, *args: Any, **kwargs: Any) -> Any:
                result = original(tensor, *args, **kwargs)
                moved(tensor, result)
                return result
            return wrapper

        def copy_(original: Any) -> Any:
            def wrapper(tensor: Any, source: Any, *args: Any, **kwargs: Any) -> Any:
                if isinstance(source, torch.Tensor) and source.device.type != tensor.device.type:
                    self.record(DEVICE_TO_HOST if source.is_cuda else HOST_TO_DEVICE,
                                tensor.element_size() * source.numel())
                return original(tensor, source, *args, **kwargs)
            return wrapper

        self._wrap(torch.Tensor, "cpu", cpu)
        self._wrap(torch.Tensor, "to", cpu)  # same rule: a result on another device is a copy
        self._wrap(torch.Tensor, "copy_", copy_)

    def _wrap_numba(self) -> None:
        try:
            from numba.cuda.cudadrv import devicearray
        except ImportError:
            return

        def to_host(original: Any) -> Any:
            def wrapper(array: Any, *args: Any, **kwargs: Any) -> Any:
                self.record(DEVICE_TO_HOST, array.nbytes)
                return original(array, *args, **kwargs)
            return wrapper

        def to_device(original: Any) -> Any:
            def wrapper(target: Any, source: Any, *args: Any, **kwargs: Any) -> Any:
                if not hasattr(source, "__cuda_array_interface__"):
                    self.record(HOST_TO_DEVICE, getattr(source, "nbytes", 0))
                return original(target, source, *args, **kwargs)
            return wrapper

        array_type = getattr(devicearray, "DeviceNDArray", None)
        if array_type is not None:
            self._wrap(array_type, "copy_to_host", to_host)
            self._wrap(array_type, "copy_to_device", to_device)  # cuda.to_device and launches copy through it

    def _wrap_cupy(self) -> None:
        try:
            import cupy
            import numpy as np
        except ImportError:
            return

        def asnumpy(original: Any) -> Any:
            def wrapper(array: Any, *args: Any, **kwargs: Any) -> Any:
                if isinstance(array, cupy.ndarray):
                    self.record(DEVICE_TO_HOST, array.nbytes)
                return original(array, *args, **kwargs)
            return wrapper

        def asarray(original: Any) -> Any:
            def wrapper(array: Any, *args: Any, **kwargs: Any) -> Any:
                if isinstance(array, np.ndarray):
                    self.record(HOST_TO_DEVICE, array.nbytes)
                return original(array, *args, **kwargs)
            return wrapper

        self._wrap(cupy, "asnumpy", asnumpy)
        self._wrap(cupy, "asarray", asarray)
