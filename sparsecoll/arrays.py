"""Turning callers' arrays into buffers the transports can send, and results back.

Host arrays (numpy) are sent as they are when C-contiguous. Device arrays (anything with
``__cuda_array_interface__``) are staged through host memory here, whole and counted by
:func:`sparsecoll.transport.device.host_copies`: the dense collectives that take them reduce and
assemble with numpy on the host, so their bytes must reach it on every transport. (Point-to-point
hands device arrays to the transport as they are; the sparse collectives select on the device
and stage only the k pairs: :func:`sparsecoll.collectives.sparse_common.float_vector`.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sparsecoll.errors import FrameError, InvalidArgumentError
from sparsecoll.transport.device import stage_to_host
from sparsecoll.wire import dtype_code


def is_device_array(array: Any) -> bool:
    """True for CUDA arrays (cupy, torch CUDA tensors, Numba device arrays)."""
    return hasattr(array, "__cuda_array_interface__")


def to_host(array: Any) -> np.ndarray:
    """A numpy view or copy of ``array`` (a contiguous device array is copied to host memory,
    counted; a strided one is refused with InvalidArgumentError)."""
    if is_device_array(array):
        return stage_to_host(array).reshape(array.__cuda_array_interface__["shape"])
    return np.asarray(array)


def as_sendable(array: Any, rank: int | None = None) -> np.ndarray:
    """The caller's array as a C-contiguous numpy array of a dtype the wire carries."""
    try:
        array = np.ascontiguousarray(to_host(array))
    except InvalidArgumentError as error:
        raise InvalidArgumentError(error.message, rank=rank) from None
    try:
        dtype_code(array.dtype)
    except FrameError:
        raise InvalidArgumentError(f"dtype {array.dtype} is not supported", rank=rank) from None
    return array


def result_buffer(array: np.ndarray, out: np.ndarray | None, shape: tuple[int, ...],
                  rank: int | None = None) -> np.ndarray:
    """``out`` checked against the result's shape and dtype, or a new array for it."""
    if out is None:
        return np.empty(shape, array.dtype)
    if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != array.dtype:
        raise InvalidArgumentError(f"out must be a {array.dtype} array of shape {shape}", rank=rank)
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise InvalidArgumentError("out must be C-contiguous and writeable", rank=rank)
    return out
