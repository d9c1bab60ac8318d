"""The unfused reference of the fused error-feedback pass, in numpy, one rounding per operation
(as torch's separate ops round): what ``kernels.fused`` must equal bit for bit."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from sparsecoll import kernels

BF16 = np.dtype(ml_dtypes.bfloat16)


def compute_type(dtype) -> type:
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def rounding(dtype):
    """Round a compute-type array to ``dtype`` and widen it back (one op's rounding)."""
    wide = compute_type(dtype)
    return lambda x: np.asarray(x).astype(dtype).astype(wide)


def reference_step(grad, residual, momentum=None, param=None, *, scale=1.0, weight_decay=0.0,
                   momentum_factor=0.0, nesterov=False, beta=1.0, send_to_grad=False, zero_grad=False):
    """New (grad, residual, momentum) after steps 1-3 of the fused pass, as numpy arrays."""
    grad_wide, state_wide = compute_type(grad.dtype), compute_type(residual.dtype)
    round_grad, round_state = rounding(grad.dtype), rounding(residual.dtype)
    g = round_grad(grad.astype(grad_wide) * grad_wide(scale))
    if weight_decay:
        g = round_grad(g + grad_wide(weight_decay) * param.astype(grad_wide))
    g = g.astype(state_wide)
    v = residual.astype(state_wide)
    new_momentum = None
    if momentum_factor:
        u, m = momentum.astype(state_wide), state_wide(momentum_factor)
        if nesterov:
            u = round_state(round_state(u + g) * m)
            p = round_state(round_state(v + u) + g)
        else:
            u = round_state(round_state(u * m) + g)
            p = round_state(v + u)
        new_momentum = u.astype(residual.dtype)
    else:
        p = round_state(v + g)
    if send_to_grad:
        new_grad = p.astype(grad.dtype)
        if beta < 1.0:
            b = state_wide(beta)
            kept = round_state(round_state(p * b) + round_state(v * state_wide(1.0 - beta)))
        else:
            kept = p
        new_residual = kept.astype(residual.dtype)
    else:
        new_residual = p.astype(residual.dtype)
        new_grad = np.zeros_like(grad) if zero_grad else grad.copy()
    return new_grad, new_residual, new_momentum


def reference_topk(sent: np.ndarray, k: int):
    return kernels.topk_exact(sent, k)
