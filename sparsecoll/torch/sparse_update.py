"""The wrapped SGD's step applied where the reduced gradient can be nonzero, not over all of it.

After a sparse reduction a bucket's gradient is zero except at the k indices the collective
returned (``ErrorFeedback.update_indices``). Plain SGD (no momentum, no weight decay: what
momentum correction leaves the wrapped SGD with, or an SGD built without them) moves a
parameter by ``-lr * grad``, which is nothing where the gradient is zero; so the step
``p[idx] -= lr * grad[idx]`` reads and writes k entries instead of the whole parameter. It uses
torch's own ``add_(grad, alpha=-lr)`` on the gathered entries, so the parameters come out as
SGD's dense step leaves them, bit for bit (tests/torch/test_fused_step.py checks it). Any other
optimizer, setting or step hook keeps the wrapped optimizer's own (dense) step.

Only float32 and float64 buckets are updated sparsely: torch's bfloat16/float16 ``add_`` rounds
differently in its vectorized body and its scalar tail, so a gathered update would land one
rounding away from the dense step for the entries that fall in a different part; those buckets
take the dense step (``p -= lr * grad`` over the bucket, as SGD does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim import optimizer as torch_optimizer

from sparsecoll.torch.buckets import Bucket
from sparsecoll.torch.error_feedback import ErrorFeedback

SPARSE_DTYPES = (torch.float32, torch.float64)


def sparse_sgd_applies(optimizer: torch.optim.Optimizer, taken_over: Sequence[str] = ()) -> bool:
    """Whether ``optimizer``'s step is plain SGD (``taken_over`` settings count as zero) and no
    step hook of its own would miss a call to it."""
    if type(optimizer) is not torch.optim.SGD:
        return False
    if (optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
            or torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks):
        return False
    for group in optimizer.param_groups:
        for name in ("momentum", "weight_decay"):
            if name not in taken_over and group.get(name, 0.0):
                return False
        if group.get("maximize") or group.get("differentiable") or group.get("foreach") or group.get("fused"):
            return False
    return True


def apply_sgd(optimizer: torch.optim.Optimizer, buckets: Sequence[Bucket], memories: Sequence[ErrorFeedback]) -> None:
    """``p -= lr * grad`` for every bucket: at ``update_indices`` only where the bucket has them,
    over the whole parameter otherwise (as SGD does)."""
    for bucket, memory in zip(buckets, memories):
        lr = float(optimizer.param_groups[bucket.group_index]["lr"])
        sgd_at(bucket.params, bucket.offsets, memory.update_indices, [lr] * len(bucket.params), bucket.flat)


def sgd_at(params: Sequence[torch.Tensor], offsets: Sequence[int], indices: torch.Tensor | None,
           lrs: Sequence[float], flat: torch.Tensor | None = None) -> None:
    """SGD's ``p -= lr * grad`` for ``params`` laid out at ``offsets`` in a flat buffer whose
    reduced gradient is zero outside the sorted ``indices`` (the buffer may hold other
    parameters between them, which are left alone): at those entries only
    (the gradient's values read from ``flat``, else from each ``.grad``), or over the whole
    parameter where ``indices`` is None, the dtype is not in :data:`SPARSE_DTYPES` or a parameter
    or its gradient is strided."""
    if not params:
        return
    dtype = flat.dtype if flat is not None else params[0].dtype
    if indices is None or dtype not in SPARSE_DTYPES:
        for param, lr in zip(params, lrs):
            if param.grad is not None:
                param.detach().add_(param.grad, alpha=-lr)
        return
    edges = [edge for param, offset in zip(params, offsets) for edge in (offset, offset + param.numel())]
    bounds = torch.searchsorted(indices, torch.tensor(edges, dtype=indices.dtype)).tolist()
    for position, (param, lr) in enumerate(zip(params, lrs)):
        start, stop = bounds[2 * position], bounds[2 * position + 1]
        if start == stop or param.grad is None:
            continue
        chosen = indices[start:stop]
        strided = not param.is_contiguous() or (flat is None and not param.grad.is_contiguous())
        if strided:  # the dense step, as SGD would take it
            param.detach().add_(param.grad, alpha=-lr)
            continue
        target = param.detach().view(-1)
        local = chosen - offsets[position]
        moved = target.index_select(0, local)
        values = flat.index_select(0, chosen) if flat is not None else param.grad.view(-1).index_select(0, local)
        moved.add_(values, alpha=-lr)
        target.index_copy_(0, local, moved)
