"""What a rank remembers between steps: residuals, DGC momentum, the warm-up and local clipping.

Deep Gradient Compression (Lin et al. 2018) in four pieces, per flat buffer:

1. local gradient clipping: each rank clips its own gradient to ``max_norm / sqrt(P)``, so that
   the sum of P clipped gradients respects ``max_norm``;
2. momentum correction: the momentum ``u = m u + g`` is kept locally and *accumulated* into the
   residual ``v += u`` (Nesterov: ``u = m (u + g)``, ``v += u + g``), so a coordinate sent late
   carries the momentum it would have had;
3. error feedback: ``v`` is what is compressed; what this rank contributed is subtracted from it,
   the rest waits for a later step;
4. momentum factor masking: ``u`` is zeroed where ``v`` was sent, so stale momentum is not
   applied twice.

ScaleCom (Chen et al. 2020, Algorithm 1) filters the memory with a factor ``memory_beta`` (β):
with ``p = m + u`` compressed to ``C(p)``, the new memory is ``m' = (1 - β) m + β (p - C(p))``
instead of ``p - C(p)``; β = 1 is plain error feedback, and β < 1 is a low-pass filter that keeps
CLT-k's memory (which holds what the leader's indices missed) from swinging step to step.

The warm-up moves the density exponentially from dense toward the target (DGC: 25%, 6.25%,
1.5625%, 0.4%, 0.1% over the first epochs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sparsecoll.collectives.sparse_common import SparseResult
from sparsecoll.torch.buckets import to_tensor


class ErrorFeedback:
    """Residual and momentum of one flat gradient buffer on this rank, in the buffer's dtype unless
    ``dtype`` asks for another (float32 residuals for a bfloat16 model, as DeepSpeed keeps)."""

    __slots__ = ("residual", "momentum", "previous")

    def __init__(self, like: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        self.residual = torch.zeros_like(like, dtype=dtype)
        self.momentum: torch.Tensor | None = None
        self.previous: torch.Tensor | None = None
        """ScaleCom's filter: the memory before this step's gradient was added (β < 1 only)."""

    def accumulate(self, grad: torch.Tensor, momentum: float = 0.0, nesterov: bool = False,
                   memory_beta: float = 1.0) -> torch.Tensor:
        """Steps 2 and 3: add this step's (momentum-corrected) gradient to the residual; return it.

        With ``memory_beta`` < 1 the memory before the addition is kept for :meth:`low_pass`.
        """
        if memory_beta < 1.0:
            if self.previous is None:
                self.previous = torch.empty_like(self.residual)
            self.previous.copy_(self.residual)
        if momentum:
            if self.momentum is None:
                self.momentum = torch.zeros_like(self.residual)
            if nesterov:
                self.momentum.add_(grad).mul_(momentum)
                self.residual.add_(self.momentum).add_(grad)
            else:
                self.momentum.mul_(momentum).add_(grad)
                self.residual.add_(self.momentum)
        else:
            self.residual.add_(grad)
        return self.residual

    def sent(self, result: SparseResult, mask_momentum: bool = True) -> None:
        """Steps 3 and 4: subtract this rank's contribution; mask momentum where it was sent."""
        if result.sent_indices is None:  # a dense contribution: keep what its codec lost
            self.residual.sub_(to_tensor(result.sent_values, self.residual).to(self.residual.dtype).view_as(self.residual))
            return
        indices = to_tensor(result.sent_indices, self.residual)
        values = to_tensor(result.sent_values, self.residual).to(self.residual.dtype)
        self.residual.index_add_(0, indices, values, alpha=-1)
        if mask_momentum and self.momentum is not None:
            self.momentum.index_fill_(0, indices, 0)

    def low_pass(self, memory_beta: float) -> None:
        """ScaleCom's filter, after :meth:`sent` (and :meth:`accumulate` with the same β):
        ``m' = (1 - β) m + β (p - C(p))``; nothing to do for β = 1."""
        if memory_beta >= 1.0:
            return
        if self.previous is None:
            raise RuntimeError("ErrorFeedback.low_pass needs accumulate(..., memory_beta=) with the same beta")
        self.residual.mul_(memory_beta).add_(self.previous, alpha=1.0 - memory_beta)

    def slice_state(self, offset: int, numel: int) -> dict:
        """Copies of ``numel`` elements of the buffers from ``offset`` (one parameter's share)."""
        momentum = None if self.momentum is None else self.momentum[offset:offset + numel].clone()
        return {"residual": self.residual[offset:offset + numel].clone(), "momentum": momentum}

    def restore_slice(self, offset: int, residual: torch.Tensor, momentum: torch.Tensor | None) -> None:
        """Write one parameter's share back from :meth:`slice_state` at ``offset``."""
        self.residual[offset:offset + residual.numel()] = residual.reshape(-1)
        if momentum is not None:
            if self.momentum is None:
                self.momentum = torch.zeros_like(self.residual)
            self.momentum[offset:offset + momentum.numel()] = momentum.reshape(-1)

    def forget(self) -> None:
        """Drop the residual (training without error feedback)."""
        self.residual.zero_()

    def state_dict(self) -> dict:
        """Copies of the buffers (this rank's: save them per rank)."""
        return {"residual": self.residual.detach().clone(),
                "momentum": None if self.momentum is None else self.momentum.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (shapes must match)."""
        residual = state["residual"]
        if residual.shape != self.residual.shape:
            raise ValueError(f"residual of {tuple(residual.shape)} elements does not fit a buffer of "
                             f"{tuple(self.residual.shape)}: the parameters changed since it was saved")
        self.residual.copy_(residual)
        momentum = state.get("momentum")
        self.momentum = None if momentum is None else momentum.to(self.residual).clone()


def warmup_density(step: int, target: float, warmup_steps: int) -> float:
    """DGC's exponential warm-up: ``target ** (step / warmup_steps)``, dense (1.0) at step 0."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return target
    return float(target ** (step / warmup_steps))


def clip_local(buffers: Sequence[torch.Tensor], max_norm: float, world_size: int) -> float:
    """Step 1: scale this rank's gradients to a norm of at most ``max_norm / sqrt(world_size)``.

    Returns the norm before clipping.
    """
    if not buffers:
        return 0.0
    total = math.sqrt(sum(float(torch.sum(buffer.double() ** 2)) for buffer in buffers))
    limit = max_norm / math.sqrt(world_size)
    if total > limit:
        scale = limit / (total + 1e-6)
        for buffer in buffers:
            buffer.mul_(scale)
    return total
