"""Per-element logic of the fused error-feedback pass, shared by the CPU (``@njit``) and CUDA
(``@cuda.jit``) kernels of :mod:`.fused`.

Arrays are stored as float32, float64 or bfloat16 bits (``uint16``: Numba has no bfloat16 type);
``load`` widens an element to its compute type (float32 for bfloat16) and ``rounded`` rounds a
computed value as the array stores it, so every operation rounds where torch's would (torch computes
a bfloat16 op in float32 and rounds its result to bfloat16; float32 and float64 ops round in
their own type). Each helper is a plain Python function, run as it is by the CUDA simulator, with a
Numba overload (``target="generic"``) that picks the branch at compile time for the CPU and GPU.
"""

from __future__ import annotations

import functools
import numpy as np
from numba import njit, types
from numba.extending import overload

_SHIFT16 = np.uint32(16)
_ONE = np.uint32(1)
_HALF_MINUS_ONE = np.uint32(0x7FFF)
_ABS32 = np.uint32(0x7FFFFFFF)
_INF32 = np.uint32(0x7F800000)
_QUIET16 = np.uint16(0x0040)


@njit(nogil=True, cache=True)
def bf16_to_f32(bits):
    """The float32 a bfloat16 (its 16 bits) stands for: exact."""
    return np.uint32(np.uint32(bits) << _SHIFT16).view(np.float32)


@njit(nogil=True, cache=True)
def f32_to_bf16(value):
    """bfloat16 bits of a float32, rounded to nearest, ties to even (as torch and ml_dtypes round)."""
    bits = np.float32(value).view(np.uint32)
    if (bits & _ABS32) > _INF32:  # NaN stays NaN (quiet), whatever rounding would do to its payload
        return np.uint16(np.uint32(bits >> _SHIFT16)) | _QUIET16
    rounding = _HALF_MINUS_ONE + (np.uint32(bits >> _SHIFT16) & _ONE)
    return np.uint16(np.uint32(np.uint32(bits + rounding) >> _SHIFT16))


def _is_bf16(array) -> bool:
    return array.dtype == np.uint16


def load(array, i):
    """Element ``i`` in its compute type (bfloat16 widened to float32)."""
    return bf16_to_f32(array[i]) if _is_bf16(array) else array[i]


def store(array, i, value):
    """Write ``value`` into element ``i``, rounded as the array stores it."""
    array[i] = f32_to_bf16(value) if _is_bf16(array) else value


def rounded(array, value):
    """``value`` rounded to the array's dtype, in its compute type (one torch op's rounding)."""
    if _is_bf16(array):
        return bf16_to_f32(f32_to_bf16(value))
    return array.dtype.type(value)


def scalar(array, value):
    """A Python float as the array's compute type (how torch passes a scalar to an op)."""
    return np.float64(value) if array.dtype == np.float64 else np.float32(value)


def stored_bits(array, value):
    """The bits ``value`` has once stored in ``array`` (what selection reads as its key)."""
    if _is_bf16(array):
        return f32_to_bf16(value)
    if array.dtype == np.float64:
        return np.float64(value).view(np.uint64)
    return np.float32(value).view(np.uint32)


@overload(load, target="generic", inline="always")
def _load(array, i):
    if array.dtype == types.uint16:
        return lambda array, i: bf16_to_f32(array[i])
    return lambda array, i: array[i]


@overload(store, target="generic", inline="always")
def _store(array, i, value):
    if array.dtype == types.uint16:
        def store_bf16(array, i, value):
            array[i] = f32_to_bf16(value)
        return store_bf16

    def store_float(array, i, value):
        array[i] = value
    return store_float


@overload(rounded, target="generic", inline="always")
def _rounded(array, value):
    if array.dtype == types.uint16:
        return lambda array, value: bf16_to_f32(f32_to_bf16(value))
    if array.dtype == types.float64:
        return lambda array, value: np.float64(value)
    return lambda array, value: np.float32(value)


@overload(scalar, target="generic", inline="always")
def _scalar(array, value):
    if array.dtype == types.float64:
        return lambda array, value: np.float64(value)
    return lambda array, value: np.float32(value)


@overload(stored_bits, target="generic", inline="always")
def _stored_bits(array, value):
    if array.dtype == types.uint16:
        return lambda array, value: f32_to_bf16(value)
    if array.dtype == types.float64:
        return lambda array, value: np.float64(value).view(np.uint64)
    return lambda array, value: np.float32(value).view(np.uint32)


def folded_gradient(grad, param, i, scale, weight_decay, with_decay):
    """Steps 1-2 of the pass for element ``i``: the clipped gradient with weight decay folded in,
    ``g * scale + weight_decay * param``, each op rounded in the gradient's dtype."""
    g = rounded(grad, load(grad, i) * scalar(grad, scale))
    if with_decay:
        g = rounded(grad, g + scalar(grad, weight_decay) * load(param, i))
    return g


def corrected(residual, momentum, i, g, momentum_factor, nesterov, with_momentum):
    """Step 3 (DGC's momentum correction and the residual): the new momentum (0 without) and
    the residual plus this step's contribution, ``p``, rounded in the residual's dtype.

    Plain: ``u = m u + g; p = v + u``; Nesterov: ``u = m (u + g); p = v + u + g``.
    """
    g = scalar(residual, g)
    v = load(residual, i)
    if not with_momentum:
        return scalar(residual, 0.0), rounded(residual, v + g)
    m = scalar(residual, momentum_factor)
    u = load(momentum, i)
    if nesterov:
        u = rounded(residual, rounded(residual, u + g) * m)
        return u, rounded(residual, rounded(residual, v + u) + g)
    u = rounded(residual, rounded(residual, u * m) + g)
    return u, rounded(residual, v + u)


def filtered(residual, p, previous, beta):
    """ScaleCom's low pass before the sent part leaves: ``beta p + (1 - beta) previous``."""
    return rounded(residual, rounded(residual, p * scalar(residual, beta))
                   + rounded(residual, previous * scalar(residual, 1.0 - beta)))


def step_element(grad, param, momentum, residual, i, send_to_grad, zero_grad, scale, weight_decay,
                 momentum_factor, nesterov, beta, with_decay, with_momentum):
    """Steps 1-3 of the fused pass for element ``i``, in place (see :mod:`.fused`): the value
    sent goes to ``grad`` when ``send_to_grad``, else to ``residual`` (``grad`` zeroed when
    ``zero_grad``)."""
    g = folded_gradient(grad, param, i, scale, weight_decay, with_decay)
    u, p = corrected(residual, momentum, i, g, momentum_factor, nesterov, with_momentum)
    if with_momentum:
        store(momentum, i, u)
    if send_to_grad:
        previous = load(residual, i)
        store(grad, i, p)
        if beta < 1.0:
            store(residual, i, filtered(residual, p, previous, beta))
        else:
            store(residual, i, p)
    else:
        store(residual, i, p)
        if zero_grad:
            grad[i] = 0


def _compiled_as_itself(function) -> None:
    """Compile a composite helper (for any target) from the same source the simulator runs."""
    @functools.wraps(function)  # the overload's signature is the helper's own
    def implementation(*args):
        return function
    overload(function, target="generic", inline="always")(implementation)


for _function in (folded_gradient, corrected, filtered, step_element):
    _compiled_as_itself(_function)
