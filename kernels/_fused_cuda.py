"""CUDA (``@cuda.jit``) twin of the fused error-feedback pass; imported only when a CUDA array
arrives. Each thread runs :func:`._fused_scalar.step_element`, the CPU kernel's element logic,
over a grid-stride range: one read of the gradient, momentum and residual, one write of each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numba import cuda

from ._cuda_compact import THREADS
from ._dispatch import BFLOAT16, as_device_vector, launch_stream
from ._fused_scalar import step_element

MAX_BLOCKS = 1024


@cuda.jit
def _accumulate_kernel(grad, param, momentum, residual, send_to_grad, zero_grad, scale, weight_decay,
                       momentum_factor, nesterov, beta):
    with_decay = param.size > 0
    with_momentum = momentum.size > 0
    for i in range(cuda.grid(1), residual.size, cuda.gridsize(1)):
        step_element(grad, param, momentum, residual, i, send_to_grad, zero_grad, scale, weight_decay,
                     momentum_factor, nesterov, beta, with_decay, with_momentum)


def _device_storage(array: Any) -> Any:
    device = as_device_vector(array.view(np.uint16) if np.dtype(array.dtype) == BFLOAT16 else array)
    return device


def accumulate(grad: Any, residual: Any, momentum: Any, segments: Sequence[tuple[int, Any]], scale: float,
               weight_decay: float, momentum_factor: float, nesterov: bool, beta: float, send_to_grad: bool,
               zero_grad: bool) -> None:
    """Steps 1-3 of :func:`.fused.accumulate_select` on device arrays, segment by segment."""
    grad_d, residual_d = _device_storage(grad), _device_storage(residual)
    momentum_d = cuda.device_array(0, residual_d.dtype) if momentum is None else _device_storage(momentum)
    no_param = cuda.device_array(0, grad_d.dtype)
    n = residual_d.size
    for position, (offset, param) in enumerate(segments):
        stop = segments[position + 1][0] if position + 1 < len(segments) else n
        if stop <= offset:
            continue
        param_d = no_param if param is None else _device_storage(param)
        part = momentum_d if momentum is None else momentum_d[offset:stop]
        blocks = min(MAX_BLOCKS, -(-(stop - offset) // THREADS))
        _accumulate_kernel[blocks, THREADS, launch_stream()](grad_d[offset:stop], param_d, part, residual_d[offset:stop],
                                            send_to_grad, zero_grad, scale, weight_decay, momentum_factor,
                                            nesterov, beta)
