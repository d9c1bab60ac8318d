"""What a rank remembers between steps: residuals, DGC momentum, the warm-up and local clipping.

Deep Gradient Compression (Lin et al. 2018) in four pieces, per flat buffer:

1. local gradient clipping: each rank clips its own gradient to ``max_norm / sqrt(P)``, so that
   the sum of P clipped gradients respects ``max_norm``;
2. momentum correction: the momentum ``u = m u + g`` is kept locally and *accumulated* into the
   residual ``v += u`` (Nesterov: ``u = m (u + g)``, ``v += u + g``), so a coordinate sent late
   carries the momentum it would have had;
3. error feedback: ``v`` is what is compressed; what this rank contributed is subtracted from it,
   the rest waits for a later step;
4. momentum factor masking (opt-in, ``momentum_masking=True``): ``u`` is zeroed where ``v`` was
   sent. DGC masks so that a late coordinate's stale momentum does not keep pushing it; but a
   coordinate sent every step then gets no momentum at all (at density 1 the step is plain SGD),
   and measured on MNIST it costs the compressed runs most of their epochs (README, "Epochs to
   accuracy"). Unmasked, what every rank sends over the steps plus its residual is exactly the
   sum of dense momentum SGD's updates (``tests/torch/test_error_feedback.py``), so it is the default.

ScaleCom (Chen et al. 2020, Algorithm 1) filters the memory with a factor ``memory_beta`` (β):
with ``p = m + u`` compressed to ``C(p)``, the new memory is ``m' = (1 - β) m + β (p - C(p))``
instead of ``p - C(p)``; β = 1 is plain error feedback, and β < 1 is a low-pass filter that keeps
CLT-k's memory (which holds what the leader's indices missed) from swinging step to step.

The warm-up moves the density exponentially from dense toward the target (DGC: 25%, 6.25%,
1.5625%, 0.4%, 0.1% over the first epochs).

:meth:`ErrorFeedback.prepare` does pieces 1-3 (with the weight-decay fold and the top-k's
candidate pass) in one read of the gradient, by ``sparsecoll.kernels.fused``, for float32,
float64 and bfloat16 buffers (float32/float64 on a GPU); other buffers take the same steps as
separate torch ops. :meth:`ErrorFeedback.settle` then touches only the k sent entries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sparsecoll.collectives.sparse_common import SparseResult
from sparsecoll.kernels import fused
from sparsecoll.torch.buckets import as_array, to_tensor
from sparsecoll.transport.staging import HostStaging

FUSED_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
FUSED_CUDA_DTYPES = (torch.float32, torch.float64)


class ErrorFeedback:
    """Residual and momentum of one flat gradient buffer on this rank, in the buffer's dtype unless
    ``dtype`` asks for another (float32 residuals for a bfloat16 model, as DeepSpeed keeps)."""

    __slots__ = ("residual", "momentum", "previous", "grad_scale", "weight_decay", "parameters",
                 "filtered_in_pass", "update_indices", "result_version", "momentum_masking", "staging")

    def __init__(self, like: torch.Tensor, dtype: torch.dtype | None = None, momentum_masking: bool = False) -> None:
        self.residual = torch.zeros_like(like, dtype=dtype)
        self.momentum_masking = bool(momentum_masking)
        """Step 4, DGC's momentum factor masking: zero ``u`` where ``v`` was sent."""
        self.momentum: torch.Tensor | None = None
        self.previous: torch.Tensor | None = None
        """ScaleCom's filter: the memory before this step's gradient was added (β < 1, unfused only)."""
        self.grad_scale = 1.0
        """Local clipping's factor for the next :meth:`prepare` (then back to 1)."""
        self.weight_decay = 0.0
        """Weight decay to fold into the next :meth:`prepare`'s gradient (then back to 0)."""
        self.parameters: list[tuple[int, torch.Tensor]] = []
        """``(offset, parameter)`` pairs covering the buffer, for the weight-decay fold."""
        self.filtered_in_pass = False
        """Whether the last :meth:`prepare` applied ScaleCom's filter already (the fused pass)."""
        self.update_indices: torch.Tensor | None = None
        """Where the last reduced gradient may be nonzero (None: anywhere); see ``reduce_buffer``."""
        self.result_version = -1
        """The buffer's ``_version`` right after the last sparse result was written into it: while
        it is unchanged, the buffer is zero outside ``update_indices``."""
        self.staging = HostStaging()
        """The buffer's pinned host memory, side stream and events for the k pairs a device step
        brings to the host (nothing is allocated until a device step needs it)."""

    def rescale(self, factor: float) -> None:
        """Multiply the residual and momentum by ``factor`` (the DDP hook's gradients changed
        units: a new loss scale under AMP)."""
        self.residual.mul_(factor)
        if self.momentum is not None:
            self.momentum.mul_(factor)

    def fold(self, *, grad_scale: float = 1.0, weight_decay: float = 0.0,
             parameters: Sequence[tuple[int, torch.Tensor]] = ()) -> None:
        """Ask the next :meth:`prepare` to use ``grad * grad_scale + weight_decay * parameter``
        (local clipping and SGD's weight decay, folded into the pass that reads the gradient)."""
        self.grad_scale = float(grad_scale)
        if weight_decay:
            self.weight_decay = float(weight_decay)
            self.parameters = list(parameters)

    def _apply_fold(self, grad: torch.Tensor) -> None:
        """The unfused fold: clip, then add weight decay, as separate torch ops."""
        if self.grad_scale != 1.0:
            grad.mul_(self.grad_scale)
        if self.weight_decay:
            for offset, param in self.parameters:
                grad[offset:offset + param.numel()].add_(param.detach().reshape(-1), alpha=self.weight_decay)
        self.grad_scale, self.weight_decay = 1.0, 0.0

    def fusable(self, grad: torch.Tensor) -> bool:
        """Whether :meth:`prepare` runs the fused kernel for ``grad`` (dtype and device allow it)."""
        dtypes = FUSED_CUDA_DTYPES if grad.device.type == "cuda" else FUSED_CPU_DTYPES
        return (grad.device.type in ("cpu", "cuda") and grad.dtype in dtypes and self.residual.dtype in dtypes
                and grad.is_contiguous() and grad.dim() == 1 and grad.device == self.residual.device)

    def prepare(self, grad: torch.Tensor, momentum: float = 0.0, nesterov: bool = False, memory_beta: float = 1.0,
                *, k: int = 0, seed: int = 0, zero_grad: bool = False) -> tuple[torch.Tensor, tuple | None]:
        """Steps 1-3 (with the fold) in one pass: returns the buffer to send and, when the fused
        pass could select (``k`` > 0 and a large enough CPU buffer), its exact top-``k``
        ``(indices, values)`` as numpy arrays, else None.

        The buffer sent is the residual, or ``grad`` under ScaleCom's filter (``memory_beta`` < 1)
        or with a residual wider than the gradient; with ``zero_grad`` a gradient that is not
        sent is zeroed in the same pass (it then only has to receive the reduced values; a sent
        gradient is the caller's to zero once the collective has read it).
        """
        if not self.fusable(grad):
            outgoing = self._unfused(grad, momentum, nesterov, memory_beta)
            if zero_grad and outgoing is not grad:
                grad.zero_()
            return outgoing, None
        if momentum and self.momentum is None:
            self.momentum = torch.zeros_like(self.residual)
        send_to_grad = memory_beta < 1.0 or self.residual.dtype != grad.dtype
        array = _kernel_array
        selection = fused.accumulate_select(
            array(grad), array(self.residual), array(self.momentum) if momentum else None,
            segments=[(offset, array(param.detach().reshape(-1))) for offset, param in self.parameters]
            if self.weight_decay else (),
            scale=self.grad_scale, weight_decay=self.weight_decay, momentum_factor=float(momentum),
            nesterov=bool(nesterov), beta=float(memory_beta), send_to_grad=send_to_grad,
            zero_grad=zero_grad and not send_to_grad, k=int(k), seed=int(seed))
        self.grad_scale, self.weight_decay = 1.0, 0.0
        self.filtered_in_pass = memory_beta < 1.0
        return (grad if send_to_grad else self.residual), selection

    def _unfused(self, grad: torch.Tensor, momentum: float, nesterov: bool, memory_beta: float) -> torch.Tensor:
        self._apply_fold(grad)
        self.filtered_in_pass = False
        outgoing = self.accumulate(grad, momentum, nesterov, memory_beta=memory_beta)
        if outgoing.dtype != grad.dtype:  # a wider residual: send in the gradient's dtype; what rounding
            grad.copy_(outgoing)          # drops stays in the residual (it subtracts what was sent)
            return grad
        return outgoing

    def settle(self, result: SparseResult, memory_beta: float = 1.0) -> None:
        """After a sparse collective: steps 3-4 and ScaleCom's filter, touching the sent entries only
        when :meth:`prepare` filtered in its pass (``m' = beta p + (1 - beta) m - beta sent``)."""
        if not self.filtered_in_pass:
            self.sent(result)
            self.low_pass(memory_beta)
            return
        if result.sent_indices is None:
            whole = to_tensor(result.sent_values, self.residual).to(self.residual.dtype).view_as(self.residual)
            self.residual.sub_(whole, alpha=memory_beta)
            return
        sent_at = to_tensor(result.sent_indices, self.residual)
        contribution = to_tensor(result.sent_values, self.residual).to(self.residual.dtype)
        self.residual.index_add_(0, sent_at, contribution, alpha=-memory_beta)
        if self.momentum_masking and self.momentum is not None:
            self.momentum.index_fill_(0, sent_at, 0)

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

    def sent(self, result: SparseResult) -> None:
        """Steps 3 and 4: subtract this rank's contribution; with ``momentum_masking``, mask
        momentum where it was sent."""
        if result.sent_indices is None:  # a dense contribution: keep what its codec lost
            self.residual.sub_(to_tensor(result.sent_values, self.residual).to(self.residual.dtype).view_as(self.residual))
            return
        indices = to_tensor(result.sent_indices, self.residual)
        values = to_tensor(result.sent_values, self.residual).to(self.residual.dtype)
        self.residual.index_add_(0, indices, values, alpha=-1)
        if self.momentum_masking and self.momentum is not None:
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


def _kernel_array(tensor: torch.Tensor):
    """The array the fused kernel takes over ``tensor``'s memory: numpy on the CPU (bfloat16 as
    ml_dtypes'), a Numba device array on a GPU."""
    if tensor.device.type == "cuda":
        from numba import cuda

        return cuda.as_cuda_array(tensor.detach())
    return as_array(tensor)


def warmup_density(step: int, target: float, warmup_steps: int) -> float:
    """DGC's exponential warm-up: ``target ** (step / warmup_steps)``, dense (1.0) at step 0."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return target
    return float(target ** (step / warmup_steps))


def squared_norm(buffers: Sequence[torch.Tensor]) -> float:
    """Sum of squares of all ``buffers`` in float64: one read of each, no temporaries, one host
    sync in all (GPU buffers' partial sums stay on the device until the end)."""
    total = 0.0
    on_device = []
    for buffer in buffers:
        if buffer.device.type == "cpu" and buffer.dtype in FUSED_CPU_DTYPES:
            total += fused.sum_squares(as_array(buffer.reshape(-1)))
        else:
            on_device.append(torch.linalg.vector_norm(buffer, dtype=torch.float64) ** 2)
    if on_device:
        total += float(torch.stack([part.to(on_device[0].device) for part in on_device]).sum())
    return total


def clip_scale(buffers: Sequence[torch.Tensor], max_norm: float, world_size: int) -> tuple[float, float]:
    """Step 1's factor: ``(norm, scale)`` that brings this rank's gradients to a norm of at most
    ``max_norm / sqrt(world_size)`` (scale 1.0 when they are within it)."""
    return clip_factor(squared_norm(buffers) if buffers else 0.0, max_norm, world_size)


def clip_factor(squared: float, max_norm: float, world_size: int) -> tuple[float, float]:
    """:func:`clip_scale` from the gradients' sum of squares, when it is known already (the
    optimizer takes it in the read that checks them for NaN/inf)."""
    total = math.sqrt(squared)
    limit = max_norm / math.sqrt(world_size)
    return total, (limit / (total + 1e-6) if total > limit else 1.0)


def clip_local(buffers: Sequence[torch.Tensor], max_norm: float, world_size: int) -> float:
    """Step 1: scale this rank's gradients to a norm of at most ``max_norm / sqrt(world_size)``.

    Returns the norm before clipping. (The optimizer instead hands :func:`clip_scale`'s factor
    to :meth:`ErrorFeedback.fold`, so that the scaling rides on the fused pass.)
    """
    total, scale = clip_scale(buffers, max_norm, world_size)
    if scale != 1.0:
        for buffer in buffers:
            buffer.mul_(scale)
    return total
