"""One dispatch on array type: numpy arrays run the ``@njit`` kernels, CUDA arrays the ``@cuda.jit`` ones.

A CUDA array is anything with ``__cuda_array_interface__`` (cupy, torch CUDA tensors, Numba
device arrays) or a Numba simulator array. ``numba.cuda`` is imported only when a CUDA array
arrives, so importing ``sparsecoll.kernels`` needs no GPU and no CUDA toolkit.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from sparsecoll.errors import InvalidArgumentError

CPU = "cpu"
CUDA = "cuda"

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
"""numpy has no bfloat16: ml_dtypes' is a real numpy dtype (views, frombuffer, ufuncs that add in
float32 and round), so bf16 gradients travel and reduce as they are."""
FLOAT_DTYPES = (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class KeyFormat:
    """How a float dtype's magnitude reads as an unsigned integer key.

    Clearing the sign bit of an IEEE float gives an unsigned integer that orders like ``|x|``,
    so selection by magnitude becomes integer comparison and works the same for every dtype
    (float16 included, which Numba's CPU target cannot do arithmetic on).
    """

    key_dtype: np.dtype
    mask: np.generic  # clears the sign bit
    inf_key: np.generic  # keys >= this are inf or NaN
    key_bits: int  # bits in a key below the sign bit


KEY_FORMATS = {
    np.dtype(np.float16): KeyFormat(np.dtype(np.uint16), np.uint16(0x7FFF), np.uint16(0x7C00), 15),
    BFLOAT16: KeyFormat(np.dtype(np.uint16), np.uint16(0x7FFF), np.uint16(0x7F80), 15),
    np.dtype(np.float32): KeyFormat(
        np.dtype(np.uint32), np.uint32(0x7FFFFFFF), np.uint32(0x7F800000), 31
    ),
    np.dtype(np.float64): KeyFormat(
        np.dtype(np.uint64),
        np.uint64(0x7FFFFFFFFFFFFFFF),
        np.uint64(0x7FF0000000000000),
        63,
    ),
}


@functools.cache
def cuda_module() -> Any:
    """``numba.cuda``, imported on first use."""
    from numba import cuda

    return cuda


_LAUNCH_STREAM: ContextVar[Any] = ContextVar("sparsecoll_kernel_stream", default=0)


def launch_stream() -> Any:
    """The CUDA stream this task's kernels and copies go on: the one :func:`on_stream` set, else
    0 (Numba's default stream)."""
    return _LAUNCH_STREAM.get()


@contextmanager
def on_stream(stream: Any) -> Iterator[None]:
    """Within this context (this task and the tasks it starts), CUDA kernels launch and copy on
    ``stream`` (a Numba stream, e.g. ``cuda.external_stream`` of torch's current stream), so
    they are ordered with the caller's work on it without a synchronisation."""
    token = _LAUNCH_STREAM.set(stream)
    try:
        yield
    finally:
        _LAUNCH_STREAM.reset(token)


def to_device(host: np.ndarray) -> Any:
    """``cuda.to_device`` on the launch stream (small arrays: counts, thresholds, indices)."""
    return cuda_module().to_device(host, stream=launch_stream())


def to_host(device: Any) -> np.ndarray:
    """``copy_to_host`` on the launch stream, complete when it returns."""
    stream = launch_stream()
    host = device.copy_to_host(stream=stream)
    if stream:
        stream.synchronize()
    return host


def is_cuda_array(array: Any) -> bool:
    """True for arrays that live on a CUDA device (or in Numba's CUDA simulator)."""
    if isinstance(array, np.ndarray):
        return False
    if hasattr(array, "__cuda_array_interface__"):
        return True
    return type(array).__name__ == "FakeCUDAArray"


def backend_of(*arrays: Any) -> str:
    """``"cpu"`` or ``"cuda"`` for a set of arrays that must all live in the same place."""
    places = {CUDA if is_cuda_array(a) else CPU for a in arrays if a is not None}
    if len(places) > 1:
        raise InvalidArgumentError("arrays mix host (numpy) and CUDA device memory")
    return places.pop() if places else CPU


def as_host_vector(array: Any, name: str = "array") -> np.ndarray:
    """A contiguous flat numpy view (or copy) of a host array."""
    host = np.asarray(array)
    return np.ascontiguousarray(host.reshape(-1))


def as_device_vector(array: Any) -> Any:
    """A flat Numba device array over a CUDA array, without copying its data."""
    cuda = cuda_module()
    if type(array).__name__ == "FakeCUDAArray":
        device = array
    else:
        device = cuda.as_cuda_array(array)
    if device.ndim != 1:
        device = device.reshape(device.size)
    return device


def float_dtype(dtype: Any, name: str = "array") -> np.dtype:
    """Checks that ``dtype`` is float16, bfloat16, float32 or float64; returns it as a numpy dtype."""
    resolved = np.dtype(dtype)
    if resolved not in FLOAT_DTYPES:
        raise InvalidArgumentError(f"{name} must be float16, bfloat16, float32 or float64, not {resolved}")
    return resolved


def key_format(dtype: Any, name: str = "array") -> KeyFormat:
    """The key format for a float dtype (raises for any other dtype)."""
    return KEY_FORMATS[float_dtype(dtype, name)]


def key_above(threshold: float, dtype: np.dtype) -> np.generic:
    """Smallest key whose magnitude is strictly greater than ``threshold`` in ``dtype``.

    ``threshold`` is exact (a Python float); rounding it to ``dtype`` would move the cut.
    """
    fmt = KEY_FORMATS[np.dtype(dtype)]
    if np.isnan(threshold):
        raise InvalidArgumentError("threshold is NaN")
    if threshold < 0:
        return fmt.key_dtype.type(0)
    threshold = abs(threshold)  # -0.0 must not carry its sign bit into the key
    if np.isinf(threshold):
        return fmt.inf_key
    cast = np.asarray(threshold, dtype=np.float64).astype(dtype)
    key = int(cast.view(fmt.key_dtype))
    if float(cast) <= threshold:
        key += 1  # the cast is not above the threshold: the next representable magnitude is
    return fmt.key_dtype.type(min(key, int(fmt.inf_key)))


def wrap_like(template: Any, device_array: Any) -> Any:
    """A device result in the template's array library (cupy in, cupy out; torch in, torch out)."""
    module = type(template).__module__.split(".")[0]
    if module == "cupy":
        import cupy

        return cupy.asarray(device_array)
    if module == "torch":
        import torch

        return torch.as_tensor(device_array, device=template.device)
    return device_array


def nonfinite_error(count: int, name: str = "array") -> InvalidArgumentError:
    """The error for input that holds NaN or inf (a top-k of those is meaningless)."""
    return InvalidArgumentError(f"{name} holds {count} NaN or inf value(s)")
