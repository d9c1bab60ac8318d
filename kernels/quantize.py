"""Stochastic quantization to b in {8, 4, 2, 1} bits with a per-block scale, bit-packed.

Each block of ``block_size`` values gets the scale ``max |x|`` (float32), and each value the
code of its stochastic rounding onto a grid from -scale to +scale (``_scalar.stochastic_code``),
so ``dequantize`` is unbiased: E[dequantize(quantize(x))] = x. The grid has 2^b - 1 points for
b >= 2 so that zero is exact (b = 2 is TernGrad's {-s, 0, s}), and {-s, +s} for b = 1.
Codes are packed little-end first, 8 / b to a byte; a block is a whole number of bytes, so
blocks are packed in parallel. The random draws come from ``(seed, element index)``, so CPU and
GPU produce the same codes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from sparsecoll.errors import InvalidArgumentError

from ._dispatch import CUDA, as_device_vector, as_host_vector, backend_of, float_dtype, wrap_like
from ._scalar import code_value, stochastic_code, uniform01

SUPPORTED_BITS = (1, 2, 4, 8)


def grid_steps(bits: int) -> int:
    """Number of intervals of the quantization grid for ``bits`` bits."""
    return 1 if bits == 1 else (1 << bits) - 2


def packed_size(size: int, bits: int) -> int:
    """Bytes that ``size`` codes of ``bits`` bits occupy."""
    return (size * bits + 7) // 8


def check_layout(bits: int, block_size: int) -> None:
    """Raises for a bit width or block size the packing cannot use."""
    if bits not in SUPPORTED_BITS:
        raise InvalidArgumentError(f"bits must be one of {SUPPORTED_BITS}, not {bits}")
    if block_size <= 0 or block_size % 8:
        raise InvalidArgumentError(f"block_size must be a positive multiple of 8, not {block_size}")


@njit(nogil=True, cache=True)
def block_absmax(x, lo, hi):
    """max |x[lo:hi]|, and whether a NaN or inf was seen."""
    top = 0.0
    finite = True
    for i in range(lo, hi):
        v = abs(np.float64(x[i]))
        if not v < np.inf:
            finite = False
        elif v > top:
            top = v
    return top, finite


@njit(nogil=True, cache=True)
def float32_scale(top):
    """``top`` as a float32 no smaller than it, so no value falls outside its block's grid."""
    scale = np.float32(top)
    if scale < top:
        scale = np.float32(top * (1.0 + 1.2e-7))
    return scale


@njit(nogil=True, cache=True)
def pack_byte(x, byte, bits, block_size, scales, seed, steps):
    """The packed byte number ``byte``: the stochastic codes of its 8 / bits values."""
    per_byte = 8 // bits
    first = byte * per_byte
    packed = 0
    for j in range(per_byte):
        i = first + j
        if i < x.size:
            code = stochastic_code(x[i], scales[i // block_size], steps, uniform01(seed, i))
            packed |= code << (bits * j)
    return np.uint8(packed)


@njit(nogil=True, cache=True)
def unpack_value(packed, i, bits, block_size, scales, steps):
    """The dequantized value of element ``i``."""
    per_byte = 8 // bits
    code = (np.int64(packed[i // per_byte]) >> (bits * (i % per_byte))) & ((1 << bits) - 1)
    return code_value(code, np.float64(scales[i // block_size]), steps)


@njit(parallel=True, nogil=True, cache=True)
def _quantize_cpu(x, bits, block_size, seed, scales, packed):
    nblocks = scales.size
    bytes_per_block = block_size * bits // 8
    steps = 1 if bits == 1 else (1 << bits) - 2
    nonfinite = np.zeros(nblocks, np.int64)
    for b in prange(nblocks):
        lo = b * block_size
        top, finite = block_absmax(x, lo, min(lo + block_size, x.size))
        scales[b] = float32_scale(top)
        nonfinite[b] = not finite
        first = b * bytes_per_block
        for byte in range(first, min(first + bytes_per_block, packed.size)):
            packed[byte] = pack_byte(x, byte, bits, block_size, scales, seed, steps)
    return nonfinite.sum()


@njit(parallel=True, nogil=True, cache=True)
def _dequantize_cpu(packed, scales, bits, block_size, out):
    steps = 1 if bits == 1 else (1 << bits) - 2
    for i in prange(out.size):
        out[i] = unpack_value(packed, i, bits, block_size, scales, steps)


def quantize(
    array: Any, bits: int, *, block_size: int = 256, seed: int = 0
) -> tuple[Any, Any]:
    """Stochastically rounds a flat float array to ``bits`` bits; returns (packed uint8, float32 scales)."""
    check_layout(bits, block_size)
    if backend_of(array) == CUDA:
        from . import _quantize_cuda

        device = as_device_vector(array)
        float_dtype(device.dtype)
        packed, scales = _quantize_cuda.quantize(device, bits, block_size, seed)
        return wrap_like(array, packed), wrap_like(array, scales)
    host = as_host_vector(array)
    float_dtype(host.dtype)
    if host.dtype.itemsize == 2:  # Numba's CPU target has no float16 (or bfloat16) arithmetic
        host = host.astype(np.float32)
    scales = np.empty(-(-host.size // block_size), np.float32)
    packed = np.empty(packed_size(host.size, bits), np.uint8)
    bad = _quantize_cpu(host, bits, block_size, np.uint64(seed), scales, packed)
    if bad:
        raise InvalidArgumentError(f"array holds NaN or inf in {int(bad)} block(s)")
    return packed, scales


def dequantize(
    packed: Any,
    scales: Any,
    bits: int,
    size: int,
    *,
    block_size: int = 256,
    dtype: Any = np.float32,
) -> Any:
    """The values that ``quantize`` encoded, as a flat array of ``size`` elements of ``dtype``."""
    check_layout(bits, block_size)
    out_dtype = float_dtype(dtype, "dtype")
    if backend_of(packed, scales) == CUDA:
        from . import _quantize_cuda

        codes, block_scales = as_device_vector(packed), as_device_vector(scales)
        _check_sizes(codes.size, block_scales.size, bits, size, block_size)
        values = _quantize_cuda.dequantize(codes, block_scales, bits, size, block_size, out_dtype)
        return wrap_like(packed, values)
    codes, block_scales = as_host_vector(packed), as_host_vector(scales)
    _check_sizes(codes.size, block_scales.size, bits, size, block_size)
    work = np.float32 if np.dtype(out_dtype).itemsize == 2 else out_dtype
    out = np.empty(size, work)
    _dequantize_cpu(codes, block_scales, bits, block_size, out)
    return out.astype(out_dtype, copy=False)


def _check_sizes(packed_bytes: int, nscales: int, bits: int, size: int, block_size: int) -> None:
    if size < 0:
        raise InvalidArgumentError(f"size must be >= 0, not {size}")
    if packed_bytes != packed_size(size, bits) or nscales != -(-size // block_size):
        raise InvalidArgumentError(
            f"{packed_bytes} packed bytes and {nscales} scales do not describe {size} values "
            f"of {bits} bits in blocks of {block_size}"
        )
