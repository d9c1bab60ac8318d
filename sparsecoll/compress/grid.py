"""LAQ's deterministic grid quantizer (Sun, Chen, Giannakis, Yang 2019, eq. (5)-(6)).

A worker quantizes the *innovation* of its gradient against the quantized gradient it last
uploaded, ``v = g - Q_last``, on a uniform grid of ``2^b`` points spanning ``[-R, R]`` with the
radius ``R = ||v||_inf``:

1. ``tau = 1 / (2^b - 1)``, the grid step is ``2 tau R``;
2. ``q_i = floor((v_i + R) / (2 tau R) + 1/2)``, an integer in ``[0, 2^b - 1]`` (b bits);
3. ``Q_new = Q_last + 2 tau R q - R``, so every coordinate's error is at most ``tau R``.

The rounding is deterministic (nearest grid point), unlike QSGD's stochastic rounding; what a
worker sends is ``R`` (one float32) and the b-bit codes, ``4 + ceil(d b / 8)`` bytes.
"""

from __future__ import annotations

import numpy as np

from sparsecoll.errors import FrameError, InvalidArgumentError

GRID_BITS = (1, 2, 4, 8)
"""Widths whose codes pack a whole number to a byte."""


def grid_bytes(count: int, bits: int) -> int:
    """Wire bytes of one quantized innovation: the float32 radius and the packed codes."""
    return 4 + (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if bits not in GRID_BITS:
        raise InvalidArgumentError(f"grid quantization takes bits in {GRID_BITS}, not {bits}")


def grid_quantize(innovation: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-2: (float32 radius as a 1-element array, packed b-bit codes) of ``innovation``."""
    _check_bits(bits)
    wide = innovation.astype(np.float64, copy=False)
    radius = np.float32(np.max(np.abs(wide))) if wide.size else np.float32(0.0)
    if not np.isfinite(radius):
        raise InvalidArgumentError("the gradient holds NaN or inf values")
    if radius < np.max(np.abs(wide), initial=0.0):  # the float32 radius must cover every value
        radius = np.nextafter(radius, np.float32(np.inf))
    levels = (1 << bits) - 1
    if radius == 0:
        codes = np.zeros(wide.size, np.uint8)
    else:
        step = 2.0 * float(radius) / levels
        codes = np.clip(np.floor((wide + float(radius)) / step + 0.5), 0, levels).astype(np.uint8)
    return np.array([radius], np.float32), _pack(codes, bits)


def grid_decode(radius: np.ndarray, packed: np.ndarray, count: int, bits: int, dtype: np.dtype) -> np.ndarray:
    """Step 3's change ``2 tau R q - R`` (add it to the last quantized gradient)."""
    _check_bits(bits)
    if packed.size != (count * bits + 7) // 8 or radius.size != 1:
        raise FrameError(f"a grid-quantized block of {count} values at {bits} bits has "
                         f"{(count * bits + 7) // 8} code bytes, not {packed.size}")
    scale = float(radius[0])
    codes = _unpack(packed, count, bits).astype(np.float64)
    return (codes * (2.0 * scale / ((1 << bits) - 1)) - scale).astype(dtype)


def grid_parts(block: memoryview | bytes, count: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(radius, packed codes) of a received block, checked for its length first."""
    expected = grid_bytes(count, bits)
    if len(block) != expected:
        raise FrameError(f"a grid-quantized block of {count} values has {expected} bytes, not {len(block)}")
    radius = np.frombuffer(block, np.float32, 1)
    if not np.isfinite(radius[0]) or radius[0] < 0:
        raise FrameError(f"grid radius {radius[0]} is not a finite non-negative number")
    return radius, np.frombuffer(block, np.uint8, offset=4)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    per_byte = 8 // bits
    padded = np.zeros(-(-codes.size // per_byte) * per_byte, np.uint8)
    padded[:codes.size] = codes
    shifts = np.arange(per_byte, dtype=np.uint8) * np.uint8(bits)
    return np.bitwise_or.reduce(padded.reshape(-1, per_byte) << shifts, axis=1).astype(np.uint8)


def _unpack(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * np.uint8(bits)
    codes = (packed[:, None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(-1)[:count]
