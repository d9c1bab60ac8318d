"""Flatten parameters' gradients into contiguous buckets that the collectives read as numpy arrays.

A bucket holds parameters of one param group, dtype and device, in order, up to a byte budget.
Its buffer is one flat tensor, and after a step every parameter's ``.grad`` is a view into it
holding the reduced mean. Backward itself is left alone: after ``zero_grad()`` autograd writes
each gradient into a tensor of its own (no zeroing, no accumulation into the buffer). A bucket
of one parameter reads that tensor where it is (its :attr:`Bucket.source`: nothing copied, the
largest layers fill a bucket alone), so its buffer only ever receives results, and after a
sparse step holds k nonzeros that the next sparse step clears at those k entries (the step
writes no zeros over the whole gradient); the other buckets copy their gradients in once.
Pointing ``.grad`` at the buffer before backward instead (DDP's ``gradient_as_bucket_view``)
costs a zeroing pass and an accumulating add over the gradient: 4 memory streams. On CPU the
buffer and ``.numpy()`` share memory. A bucket keeps its parameters' dtype:
``float16`` and ``bfloat16`` (numpy's view of it is ml_dtypes' ``bfloat16``) buckets send 2 bytes
a value, and the collectives widen to float32 only where they add.

CUDA: :func:`as_array` gives the collectives a Numba device array over the tensor's memory (no
copy): the sparse ones select on the device and move only k (index, value) pairs to the host, the
others stage it there themselves, counted (:func:`sparsecoll.transport.device.host_copies`).
bfloat16 CUDA buffers are staged to host memory whole (Numba has no bfloat16 on the device), and
counted. :func:`to_tensor` brings a host result to the device (counted; k-sized for sparse ones).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import torch

from sparsecoll.transport.device import count_host_copy

DEFAULT_BUCKET_BYTES = 25 << 20
"""Bucket budget, DDP's default (``bucket_cap_mb=25``)."""



def small_parameters(param: torch.Tensor) -> bool:
    """The default exclusion rule: biases and norm weights (at most one dimension) go dense."""
    return param.dim() <= 1


@dataclass
class Bucket:
    """Parameters whose gradients travel together, and their flat gradient buffer."""

    index: int
    params: list[torch.Tensor]
    group_index: int
    compressed: bool
    flat: torch.Tensor
    offsets: list[int] = field(default_factory=list)
    source: torch.Tensor | None = None
    """This step's gradient where autograd wrote it (flat), when the step reads it there rather
    than from :attr:`flat`; None otherwise (see :meth:`gather_grads`)."""

    @property
    def gradient(self) -> torch.Tensor:
        """This step's gradient, flat: :attr:`source`, else the buffer."""
        return self.flat if self.source is None else self.source

    @property
    def size(self) -> int:
        """Elements in the bucket."""
        return self.flat.numel()

    def slice(self, position: int) -> torch.Tensor:
        """The buffer region of the ``position``-th parameter, shaped like it."""
        param = self.params[position]
        start = self.offsets[position]
        return self.flat[start:start + param.numel()].view(param.shape)

    def gather_grads(self) -> None:
        """Bring every gradient into the buffer; a missing gradient counts as zero (as in DDP).

        A bucket of one parameter whose gradient is a contiguous tensor of the buffer's dtype and
        device keeps that tensor as :attr:`source` (nothing copied; the buffer is left as it
        is, for the result); otherwise each gradient is copied into its region once and ``.grad``
        becomes the region."""
        self.source = None
        for position, param in enumerate(self.params):
            grad = param.grad
            region = self.slice(position)
            if grad is None:
                region.zero_()
                continue
            check_gradient(grad)
            if _is_view_of(grad, region):
                continue
            if self._readable_in_place(grad):
                self.source = grad.detach().view(-1)
                continue
            region.copy_(grad)
            if grad.dtype == region.dtype:
                param.grad = region

    def _readable_in_place(self, grad: torch.Tensor) -> bool:
        """Whether the step can read ``grad`` where it is: the only parameter's, laid out as the buffer."""
        return (len(self.params) == 1 and grad.dtype == self.flat.dtype and grad.device == self.flat.device
                and grad.is_contiguous() and not grad.requires_grad)

    def scatter_grads(self) -> None:
        """Make every ``.grad`` hold the reduced gradient now in the buffer (the step's source,
        if any, is released)."""
        self.source = None
        for position, param in enumerate(self.params):
            region = self.slice(position)
            if param.dtype == region.dtype:
                if not _is_view_of(param.grad, region):
                    param.grad = region
            elif param.grad is None:
                param.grad = region.to(param.dtype)
            else:
                param.grad.copy_(region)

    def zero_grads(self, set_to_none: bool = True) -> None:
        """As ``Optimizer.zero_grad``: gradients become None, or zero in place (views stay attached)."""
        if set_to_none:
            for param in self.params:
                param.grad = None
            return
        self.flat.zero_()
        for position, param in enumerate(self.params):
            if param.grad is not None and not _is_view_of(param.grad, self.slice(position)):
                param.grad.zero_()


def _is_view_of(grad: torch.Tensor | None, region: torch.Tensor) -> bool:
    return (grad is not None and grad.data_ptr() == region.data_ptr() and grad.dtype == region.dtype
            and grad.shape == region.shape and grad.stride() == region.stride())


def check_gradient(grad: torch.Tensor) -> None:
    """Sparse-layout and complex gradients cannot be compressed: say so clearly."""
    if grad.layout != torch.strided:
        raise TypeError(f"sparsecoll needs dense (strided) gradients, got layout {grad.layout}; "
                        "use sparse=False in nn.Embedding and similar modules")
    if grad.is_complex():
        raise TypeError(f"sparsecoll compresses real gradients, got {grad.dtype}; "
                        "view complex parameters as real (torch.view_as_real) first")
    if not grad.is_floating_point():
        raise TypeError(f"gradients must be floating point, got {grad.dtype}")


def check_parameter(param: torch.Tensor) -> None:
    """Complex or integer parameters are refused when the optimizer is built."""
    if param.is_complex():
        raise TypeError(f"complex parameters are not supported ({param.dtype}); "
                        "register them as real views (torch.view_as_real)")
    if not param.is_floating_point():
        raise TypeError(f"parameters must be floating point, got {param.dtype}")


def build_buckets(param_groups: Sequence[dict], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                  dense_if: Callable[[torch.Tensor], bool] | None = small_parameters) -> list[Bucket]:
    """Buckets of the trainable parameters, in group and parameter order.

    Parameters for which ``dense_if`` is true go to buckets that are always reduced dense.
    A bucket never mixes param groups (their momentum may differ), dtypes or devices.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[Bucket] = []
    for group_index, group in enumerate(param_groups):
        pending: dict[tuple, list[torch.Tensor]] = {}
        for param in group["params"]:
            if not param.requires_grad:
                continue
            check_parameter(param)
            compressed = not (dense_if is not None and dense_if(param))
            key = (compressed, param.dtype, param.device)
            members = pending.setdefault(key, [])
            members.append(param)
            if sum(p.numel() for p in members) * param.element_size() >= bucket_bytes:
                buckets.append(_make_bucket(len(buckets), members, group_index, compressed))
                pending[key] = []
        for (compressed, _, _), members in pending.items():
            if members:
                buckets.append(_make_bucket(len(buckets), members, group_index, compressed))
    return buckets


def _make_bucket(index: int, params: list[torch.Tensor], group_index: int, compressed: bool) -> Bucket:
    dtype = params[0].dtype
    offsets, total = [], 0
    for param in params:
        offsets.append(total)
        total += param.numel()
    flat = torch.zeros(total, dtype=dtype, device=params[0].device)
    return Bucket(index, list(params), group_index, compressed, flat, offsets)


def layout_signature(buckets: Iterable[Bucket]) -> np.ndarray:
    """A small int64 vector that differs when the parameter layout differs (count, shapes, dtypes)."""
    digest = hashlib.sha256()
    count = 0
    for bucket in buckets:
        digest.update(f"[{bucket.index} {bucket.compressed} {bucket.flat.dtype}]".encode())
        for param in bucket.params:
            digest.update(f"{tuple(param.shape)}:{param.dtype};".encode())
            count += 1
    return np.concatenate([[count], np.frombuffer(digest.digest()[:16], np.int64)]).astype(np.int64)


def as_array(tensor: torch.Tensor):
    """The array the collectives see: a numpy view on CPU; on CUDA see the module notes."""
    on_device = tensor.device.type == "cuda"
    if tensor.dtype == torch.bfloat16:  # numpy cannot take it from torch: the same bits as ml_dtypes'
        if on_device:
            count_host_copy(tensor.numel() * 2)
        return tensor.detach().view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
    if on_device:
        from numba import cuda

        return cuda.as_cuda_array(tensor.detach())
    return tensor.detach().numpy()


def to_tensor(array, like: torch.Tensor) -> torch.Tensor:
    """A host (numpy) or device result as a tensor on ``like``'s device: a view where it can be
    (numpy on CPU, a device array on its GPU), else a copy (host to device: counted)."""
    if not isinstance(array, np.ndarray):
        return torch.as_tensor(array, device=like.device)  # __cuda_array_interface__: no copy
    if not array.flags.writeable:
        array = array.copy()
    host = np.ascontiguousarray(array)
    if like.device.type != "cpu":
        count_host_copy(host.nbytes)
    if host.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(host.view(np.int16)).view(torch.bfloat16).to(like.device)
    return torch.from_numpy(host).to(like.device)
