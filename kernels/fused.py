"""The fused error-feedback pass: one read of the gradient per step (Deep Gradient Compression's
bookkeeping and the top-k's candidate pass in one kernel).

For a flat gradient ``g`` with residual ``v`` and momentum ``u`` (:mod:`sparsecoll.torch.error_feedback`
defines them), :func:`accumulate_select`

1. clips and folds weight decay in: ``g = g * scale + weight_decay * param``;
2. corrects momentum (plain ``u = m u + g; p = v + u``, Nesterov ``u = m (u + g); p = v + u + g``),
   or without momentum ``p = v + g``;
3. stores ``p`` in the residual (and zeroes ``g``, which then only has to receive the k reduced
   values) or, with ScaleCom's filter ``beta < 1`` or a residual wider than the gradient, sends
   ``p`` from ``g`` and keeps ``beta p + (1 - beta) v`` (``p`` in the wider dtype) as the memory;
4. collects, in the same pass, the candidates of a sampled-threshold top-k of the sent values,
   and finishes them to exactly the k largest (the set ``kernels.topk`` gives, ties to the lower
   index), reading candidates only.

Every element's arithmetic rounds as torch's unfused ops do (:mod:`._fused_scalar`). The CUDA
kernel does steps 1-3 in one pass with the same scalar code; its selection is left to the
collective (``kernels.topk`` on the device), so it returns no candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sparsecoll.errors import InvalidArgumentError

from . import _fused_cpu as cpu
from . import _select_cpu
from ._dispatch import BFLOAT16, CUDA, backend_of, key_format
from .select import FAST_MIN_SIZE, _exact_host, _finish_exact_k, _sample_runs, _sample_threshold, SAMPLE_RUN

FUSED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), BFLOAT16)
"""Dtypes the fused pass computes in (Numba has no float16 arithmetic: float16 buckets take the
unfused path)."""


def storage(array: Any) -> Any:
    """The array as the kernels take it: bfloat16 as its uint16 bits, other floats as they are."""
    return array.view(np.uint16) if np.dtype(array.dtype) == BFLOAT16 else array


def _empty_like(array: Any) -> np.ndarray:
    return np.empty(0, array.dtype)


def accumulate_select(grad: Any, residual: Any, momentum: Any = None, *,
                      segments: Sequence[tuple[int, Any]] = (), scale: float = 1.0, weight_decay: float = 0.0,
                      momentum_factor: float = 0.0, nesterov: bool = False, beta: float = 1.0,
                      send_to_grad: bool = False, zero_grad: bool = False, k: int = 0,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """Steps 1-4 above, in place on flat ``grad``, ``residual`` and ``momentum`` (None: none).

    ``segments`` lists ``(offset, parameter)`` pairs (flat, the gradient's dtype) covering the
    buffer in order, needed only with ``weight_decay``. Returns the top ``k`` (indices ascending,
    values as sent) of the sent buffer, or None when ``k`` is 0, the buffer is too small or too
    dense for the sampled path (``kernels.topk`` then selects exactly as before), the buffer
    holds NaN/inf (left for the collective's own check to report), or the arrays are on a GPU.
    """
    _check(grad, residual, momentum, beta, send_to_grad)
    if weight_decay and sum(np.size(param) for _, param in segments) != np.size(grad):
        raise InvalidArgumentError("weight decay needs parameter segments that cover the buffer")
    if not weight_decay:
        segments = ((0, None),)
    if backend_of(grad, residual, momentum) == CUDA:
        from . import _fused_cuda

        _fused_cuda.accumulate(grad, residual, momentum, segments, scale, weight_decay, momentum_factor,
                               nesterov, beta, send_to_grad, zero_grad)
        return None
    return _host(grad, residual, momentum, segments, scale, weight_decay, momentum_factor, nesterov, beta,
                 send_to_grad, zero_grad, k, seed)


def _check(grad, residual, momentum, beta: float, send_to_grad: bool) -> None:
    for name, array in (("grad", grad), ("residual", residual), ("momentum", momentum)):
        if array is not None and np.dtype(array.dtype) not in FUSED_DTYPES:
            raise InvalidArgumentError(f"{name} must be float32, float64 or bfloat16 for the fused pass, "
                                       f"not {np.dtype(array.dtype)}")
    if np.size(residual) != np.size(grad) or (momentum is not None and np.size(momentum) != np.size(grad)):
        raise InvalidArgumentError("grad, residual and momentum must have the same size")
    if momentum is not None and np.dtype(momentum.dtype) != np.dtype(residual.dtype):
        raise InvalidArgumentError("momentum and residual must share a dtype")
    if not 0.0 < beta <= 1.0:
        raise InvalidArgumentError(f"beta must be in (0, 1], got {beta}")
    if not send_to_grad and (beta < 1.0 or np.dtype(residual.dtype) != np.dtype(grad.dtype)):
        raise InvalidArgumentError("beta < 1 or a residual dtype other than the gradient's needs send_to_grad=True")


def _host(grad, residual, momentum, segments, scale, weight_decay, momentum_factor, nesterov, beta,
          send_to_grad, zero_grad, k, seed):
    send = grad if send_to_grad else residual
    send_dtype = np.dtype(send.dtype)
    fmt = key_format(send_dtype)
    grad_s, residual_s = storage(grad), storage(residual)
    momentum_s = _empty_like(residual_s) if momentum is None else storage(momentum)
    send_s = grad_s if send_to_grad else residual_s
    send_bits = send_s.view(fmt.key_dtype)
    n = residual_s.size
    pieces = []
    for position, (offset, param) in enumerate(segments):
        stop = segments[position + 1][0] if position + 1 < len(segments) else n
        piece = slice(offset, stop)
        pieces.append((piece, _empty_like(grad_s) if param is None else storage(param).reshape(-1),
                       momentum_s if momentum is None else momentum_s[piece]))
    fast = k > 0 and n >= FAST_MIN_SIZE and k * 8 <= n
    key_min, cap = fmt.inf_key, 1
    if fast:
        runs = _sample_runs(n, k)
        sample = [cpu.sample_keys(grad_s[piece], param, part, residual_s[piece], send_s[piece], scale, weight_decay,
                                  momentum_factor, nesterov, fmt.mask, np.uint64(seed + position),
                                  -(-runs * (piece.stop - piece.start) // n), SAMPLE_RUN)
                  for position, (piece, param, part) in enumerate(pieces)
                  if piece.stop - piece.start >= SAMPLE_RUN]
        keys = np.concatenate(sample).astype(fmt.key_dtype) if sample else np.empty(0, fmt.key_dtype)
        fast = keys.size > 0
    if fast:
        key_min, fraction = _sample_threshold(keys, n, k, approximate=False)
        cap = int(2 * fraction * _select_cpu.CHUNK) + 64
    indices, raws, nonfinite = [], [], 0
    for piece, param, part in pieces:
        slot_idx, slot_bits, counts, bad = cpu.accumulate(
            grad_s[piece], param, part, residual_s[piece], send_bits[piece], send_to_grad, zero_grad, scale,
            weight_decay, momentum_factor, nesterov, beta, fmt.mask, key_min, fmt.inf_key, _select_cpu.CHUNK, cap)
        nonfinite += int(bad)
        if fast and not nonfinite:
            idx, raw = _select_cpu.gather_slots(send_bits[piece], fmt.mask, key_min, _select_cpu.CHUNK, cap,
                                                slot_idx, slot_bits, counts)
            indices.append(idx + piece.start)
            raws.append(raw)
    if not fast or nonfinite:
        return None
    idx, raw = np.concatenate(indices), np.concatenate(raws)
    if idx.size < k:  # the sample overestimated the cut: exact selection over the sent buffer
        idx, raw = _exact_host(send_bits, fmt, k)
    else:
        idx, raw = _finish_exact_k(idx, raw, fmt, k)
    return idx, raw.view(send_dtype)


def sum_squares(array: Any) -> float:
    """Sum of squares of a host float32/float64/bfloat16 array in float64: one pass, no
    temporaries."""
    return float(cpu.sum_squares(storage(np.asarray(array).reshape(-1)), _select_cpu.CHUNK))
