"""CUDA kernels behind ``quantize``: one thread per block scale, per packed byte, per value.

They call the same scalar functions as the CPU kernels, so both produce identical codes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from sparsecoll.errors import InvalidArgumentError

from ._cuda_compact import THREADS, device_function
from .quantize import block_absmax as cpu_block_absmax
from .quantize import float32_scale, grid_steps, packed_size
from .quantize import pack_byte as cpu_pack_byte
from .quantize import unpack_value as cpu_unpack_value
from ._dispatch import launch_stream, to_device, to_host

block_absmax = device_function(cpu_block_absmax)
pack_byte = device_function(cpu_pack_byte)
unpack_value = device_function(cpu_unpack_value)


@cuda.jit
def _scale_kernel(x, block_size, scales, bad):
    b = cuda.grid(1)
    if b < scales.size:
        lo = b * block_size
        top, finite = block_absmax(x, lo, min(lo + block_size, x.size))
        scales[b] = float32_scale(top)
        if not finite:
            cuda.atomic.add(bad, 0, 1)


@cuda.jit
def _pack_kernel(x, bits, block_size, scales, seed, steps, packed):
    byte = cuda.grid(1)
    if byte < packed.size:
        packed[byte] = pack_byte(x, byte, bits, block_size, scales, seed, steps)


@cuda.jit
def _unpack_kernel(packed, scales, bits, block_size, steps, out):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = unpack_value(packed, i, bits, block_size, scales, steps)


def _blocks(n: int) -> int:
    return max(1, -(-n // THREADS))


def quantize(x: Any, bits: int, block_size: int, seed: int) -> tuple[Any, Any]:
    nscales = -(-x.size // block_size)
    scales = cuda.device_array(nscales, np.float32)
    packed = cuda.device_array(packed_size(x.size, bits), np.uint8)
    bad = to_device(np.zeros(1, np.int64))
    if nscales:
        _scale_kernel[_blocks(nscales), THREADS, launch_stream()](x, block_size, scales, bad)
        flagged = int(to_host(bad)[0])
        if flagged:
            raise InvalidArgumentError(f"array holds NaN or inf in {flagged} block(s)")
        steps = grid_steps(bits)
        _pack_kernel[_blocks(packed.size), THREADS, launch_stream()](x, bits, block_size, scales, np.uint64(seed), steps, packed)
    return packed, scales


def dequantize(packed: Any, scales: Any, bits: int, size: int, block_size: int, dtype: np.dtype) -> Any:
    out = cuda.device_array(size, dtype)
    if size:
        _unpack_kernel[_blocks(size), THREADS, launch_stream()](packed, scales, bits, block_size, grid_steps(bits), out)
    return out
