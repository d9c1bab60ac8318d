"""Device buffers as the transports see them: sizes from ``__cuda_array_interface__``, and the
staging copies a transport that only moves host bytes (TCP) needs.

A device array (cupy, a torch CUDA tensor, a Numba device array: anything with
``__cuda_array_interface__``) is never handed to ``memoryview``: its byte count and dtype come
from the interface, and an array whose strides are not C-contiguous (or that has a mask) is
refused with :class:`~sparsecoll.errors.InvalidArgumentError` rather than sent as the wrong
bytes. UCX takes such arrays as they are; TCP copies them to host memory first
(:func:`stage_to_host`, into pinned memory when a CUDA driver is there) and back
(:func:`copy_from_host`). The copies use the array's own ``copy_to_host``/``copy_to_device``
when it has them (Numba's device-array API), else Numba's view of the interface.

An array that speaks only DLPack (``__dlpack__``/``__dlpack_device__``, no
``__cuda_array_interface__`` and no numpy form: JAX, TensorFlow, a framework's own type) is
adopted where it enters the group (:func:`adopt_dlpack`): a CPU one becomes a numpy view, a
CUDA one a cupy array or a torch CUDA tensor over the same memory (no copy, no host staging),
as ``cupy.from_dlpack`` and ``torch.from_dlpack`` make them; any other device is refused.

Every staging copy between device and host memory that the library makes is counted
(:func:`host_copies`, :func:`reset_host_copies`), so a GPU run can prove that a step moved only
k-sized arrays across the bus and never a d-sized one. Counted: the transports' staging and
device receives through host memory (this module, UCX's inline payloads, the mailbox), the
collectives' (the k pairs and k values of the sparse ones, the whole array where one reduces on
the host: ``arrays.to_host``, ``sparse_common.device_to_host``/``gather_values``) and the torch
layer's (results to the device in ``buckets.to_tensor``, bfloat16 CUDA buckets, the replicas'
broadcast). Not counted: the kernels' own small transfers (a histogram, block counts, a NaN
flag, the top-k's candidates and k results: O(k) or constant) and torch's scalar reads
(``all_finite``, the clipping norm).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from sparsecoll.errors import InvalidArgumentError


class HostCopies(NamedTuple):
    """Staging copies between device and host memory since the last :func:`reset_host_copies`:
    how many (both directions), their bytes in all, and the largest single one in bytes."""

    count: int
    bytes: int
    largest: int


class _CopyCounter:
    """The process-wide tally behind :func:`host_copies` (copies run on several threads)."""

    lock = threading.Lock()
    count = 0
    bytes = 0
    largest = 0


def host_copies() -> HostCopies:
    """Device<->host staging copies made by sparsecoll in this process since the last reset
    (every thread, both directions: transports' staging, collectives' host reductions, the
    torch layer's device path)."""
    with _CopyCounter.lock:
        return HostCopies(_CopyCounter.count, _CopyCounter.bytes, _CopyCounter.largest)


def reset_host_copies() -> None:
    """Set the :func:`host_copies` tally back to zero."""
    with _CopyCounter.lock:
        _CopyCounter.count = _CopyCounter.bytes = _CopyCounter.largest = 0


def count_host_copy(nbytes: int) -> None:
    """Record one device<->host copy of ``nbytes`` bytes (every staging path calls this)."""
    with _CopyCounter.lock:
        _CopyCounter.count += 1
        _CopyCounter.bytes += nbytes
        _CopyCounter.largest = max(_CopyCounter.largest, nbytes)


def is_device(buffer: Any) -> bool:
    """True for CUDA device arrays (cupy, torch CUDA tensors, Numba device arrays)."""
    return hasattr(buffer, "__cuda_array_interface__")


DLPACK_CPU, DLPACK_CUDA, DLPACK_CUDA_MANAGED = 1, 2, 13
"""DLPack's device types (``DLDeviceType``) that sparsecoll takes: host memory, CUDA device and
CUDA managed memory. (Pinned host memory, 3, and every other accelerator are refused.)"""

ACCEPTED = ("numpy arrays (or anything numpy.asarray takes), CUDA arrays with __cuda_array_interface__ "
            "(cupy, torch CUDA tensors, Numba device arrays), and DLPack arrays in host or CUDA memory")


def adopt_dlpack(array: Any) -> Any:
    """``array`` as the collectives and transports take it: unchanged unless it speaks only
    DLPack (see the module notes); then a numpy view (CPU) or a CUDA array over the same memory
    (by the first of :func:`cuda_dlpack_importers`), else InvalidArgumentError."""
    if (is_device(array) or isinstance(array, np.ndarray) or hasattr(array, "__array__")
            or not hasattr(array, "__dlpack__") or not hasattr(array, "__dlpack_device__")):
        return array
    device_type, device_id = (int(part) for part in array.__dlpack_device__())
    if device_type == DLPACK_CPU:
        try:
            return np.from_dlpack(array)
        except (BufferError, RuntimeError, TypeError) as error:  # a dtype numpy lacks, a tensor needing grad
            raise InvalidArgumentError(f"numpy cannot import this host DLPack array ({error}); "
                                       f"sparsecoll takes {ACCEPTED}") from None
    if device_type in (DLPACK_CUDA, DLPACK_CUDA_MANAGED):
        importers = cuda_dlpack_importers()
        if not importers:
            raise InvalidArgumentError(
                f"a DLPack array on CUDA device {device_id} needs cupy or a CUDA build of torch to be "
                f"imported without a copy, and neither is here; sparsecoll takes {ACCEPTED}")
        try:
            return importers[0](array)
        except (BufferError, RuntimeError, TypeError, ValueError) as error:
            raise InvalidArgumentError(f"the CUDA DLPack array could not be imported ({error}); "
                                       f"sparsecoll takes {ACCEPTED}") from None
    raise InvalidArgumentError(f"a DLPack array on device type {device_type} (DLPack's DLDeviceType) cannot "
                               f"be sent; sparsecoll takes {ACCEPTED}")


def cuda_dlpack_importers() -> list[Callable[[Any], Any]]:
    """The ``from_dlpack`` functions here that make CUDA arrays with ``__cuda_array_interface__``
    from a CUDA DLPack array without copying: cupy's, then torch's (a CUDA build only)."""
    importers = []
    try:
        import cupy

        importers.append(cupy.from_dlpack)
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            importers.append(torch.from_dlpack)
    except ImportError:
        pass
    return importers


def interface_of(buffer: Any) -> dict[str, Any]:
    """``buffer``'s ``__cuda_array_interface__``, checked: contiguous, unmasked, a dtype numpy knows."""
    interface = buffer.__cuda_array_interface__
    if interface.get("mask") is not None:
        raise InvalidArgumentError("masked device arrays cannot be sent; fill the masked entries first")
    dtype = np.dtype(interface["typestr"])
    shape = tuple(interface["shape"])
    strides = interface.get("strides")
    contiguous = strides is None or all(stride == expected for stride, expected, extent
                                        in zip(strides, _c_strides(shape, dtype.itemsize), shape) if extent > 1)
    if not contiguous:
        raise InvalidArgumentError(
            f"a device array of shape {shape} with strides {tuple(strides)} is not C-contiguous; pass a "
            f"contiguous copy (cupy.ascontiguousarray, tensor.contiguous())")
    return interface


def device_dtype(buffer: Any) -> np.dtype:
    """The element type a device array's interface declares."""
    return np.dtype(interface_of(buffer)["typestr"])


def device_nbytes(buffer: Any) -> int:
    """Bytes of a contiguous device array, from its interface (no ``memoryview``)."""
    interface = interface_of(buffer)
    return math.prod(interface["shape"]) * np.dtype(interface["typestr"]).itemsize


def is_writeable(buffer: Any) -> bool:
    """False when the interface marks the device memory read-only."""
    return not buffer.__cuda_array_interface__["data"][1]


def stage_to_host(buffer: Any) -> np.ndarray:
    """A host copy of a contiguous device array, flat, in pinned memory where CUDA allows."""
    shape, dtype = _layout(buffer)
    host = _host_array(shape, dtype)
    _copier(buffer).copy_to_host(host)
    count_host_copy(host.nbytes)
    return host.reshape(-1)


def copy_from_host(host: np.ndarray, buffer: Any) -> None:
    """Copy ``host`` (as many elements as the device array holds, same dtype) into ``buffer``."""
    interface = interface_of(buffer)
    if not is_writeable(buffer):
        raise InvalidArgumentError("the device array is read-only")
    shape, dtype = tuple(interface["shape"]), np.dtype(interface["typestr"])
    source = np.ascontiguousarray(host, dtype).reshape(shape)
    _copier(buffer).copy_to_device(source)
    count_host_copy(source.nbytes)


def device_bytes(buffer: Any) -> Any:
    """A flat uint8 view of a contiguous device array's memory (no copy): what a transport that
    moves device memory receives into, sliced by byte offsets as a host ``memoryview`` is."""
    shape, dtype = _layout(buffer)
    return _copier(buffer).reshape(math.prod(shape)).view(np.uint8)


def write_bytes(sink: Any, data: Any) -> None:
    """Copy host bytes ``data`` (as long as ``sink``) into the uint8 device array ``sink``
    (a payload that landed in host memory, going to a device receive buffer), counted."""
    host = np.frombuffer(data, np.uint8)
    _copier(sink).copy_to_device(host)
    count_host_copy(host.nbytes)


def _layout(buffer: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a contiguous device array, from its interface."""
    interface = interface_of(buffer)
    return tuple(interface["shape"]), np.dtype(interface["typestr"])


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for extent in reversed(shape):
        strides.append(step)
        step *= extent
    return tuple(reversed(strides))


def _host_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Pinned host memory when a CUDA driver is there (faster copies), else plain."""
    try:
        from numba import cuda

        if cuda.is_available():
            return cuda.pinned_array(shape, dtype)
    except ImportError:
        pass
    return np.empty(shape, dtype)


def _copier(buffer: Any) -> Any:
    """What copies ``buffer`` to and from the host: itself when it speaks Numba's device-array
    API, else Numba's view of its interface (imported only when a device array is seen)."""
    if hasattr(buffer, "copy_to_host") and hasattr(buffer, "copy_to_device"):
        return buffer
    from numba import cuda

    return cuda.as_cuda_array(buffer)
