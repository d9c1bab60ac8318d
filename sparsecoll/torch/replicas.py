"""Keep replicas identical, as DDP does: rank 0's parameters and buffers on every rank.

:func:`broadcast_tensors` copies rank 0's values into the same tensors on every other rank, one
broadcast per dtype and device (the tensors flattened into one buffer). 16-bit floats and bools
travel as their bits (int16, uint8): a broadcast adds nothing, so the bits are all it needs.
:class:`BufferBroadcast` is a forward pre-hook that does it for a module's buffers (BatchNorm's
running statistics) before every training forward, as ``DistributedDataParallel(...,
broadcast_buffers=True)`` does.

CUDA tensors travel through host memory here (the broadcast's bytes on the wire are the same),
counted by :func:`sparsecoll.transport.device.host_copies`: parameters once, when the optimizer
is built or a param group added, and a module's buffers (running statistics, not gradients)
before each forward when :class:`BufferBroadcast` is on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from sparsecoll.sync import SyncGroup
from sparsecoll.transport.device import count_host_copy

_AS_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.bool: torch.uint8}


def broadcast_tensors(sync: SyncGroup, tensors: Iterable[torch.Tensor], root: int = 0) -> int:
    """Overwrite ``tensors`` on every rank with ``root``'s values; returns the bytes broadcast.

    Every rank must pass tensors of the same shapes and dtypes in the same order (a mismatch
    raises CollectiveMismatchError on every rank, from the broadcast's signature).
    """
    grouped: dict[tuple, list[torch.Tensor]] = {}
    for tensor in tensors:
        grouped.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    total = 0
    for (dtype, _), members in sorted(grouped.items(), key=lambda item: (str(item[0][0]), str(item[0][1]))):
        total += _broadcast_same_kind(sync, members, _AS_BITS.get(dtype, dtype), root)
    return total


def _broadcast_same_kind(sync: SyncGroup, members: Sequence[torch.Tensor], carrier: torch.dtype, root: int) -> int:
    with torch.no_grad():
        flat = torch.cat([member.detach().reshape(-1).view(carrier).cpu() for member in members])
        on_device = members[0].device.type == "cuda"
        if on_device:
            count_host_copy(flat.numel() * flat.element_size())
        array = flat.numpy()
        sync.broadcast(array, root, out=array)
        if sync.rank != root:
            if on_device:
                count_host_copy(flat.numel() * flat.element_size())
            offset = 0
            for member in members:
                member.view(carrier).copy_(flat[offset:offset + member.numel()].view(member.shape))
                offset += member.numel()
    return flat.numel() * flat.element_size()


def replicated_tensors(param_groups: Sequence[dict], module: torch.nn.Module | None = None) -> list[torch.Tensor]:
    """What must start equal on every rank: the groups' parameters (frozen ones too), then the
    module's other parameters and its buffers, each once, in a rank-independent order."""
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()
    extra = [] if module is None else [*module.parameters(), *module.buffers()]
    for tensor in [*(param for group in param_groups for param in group["params"]), *extra]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors.append(tensor)
    return tensors


class BufferBroadcast:
    """Forward pre-hook: rank 0's buffers of ``module`` on every rank before each training forward.

    Like DDP it runs only when the module is training and gradients are enabled, so evaluation
    (``model.eval()`` or ``torch.no_grad()``) may run on some ranks only.
    """

    def __init__(self, sync: SyncGroup, module: torch.nn.Module) -> None:
        self.sync = sync
        self.module = module
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module: torch.nn.Module, inputs: tuple) -> None:
        if module.training and torch.is_grad_enabled():
            broadcast_tensors(self.sync, module.buffers())

    def remove(self) -> None:
        """Stop broadcasting before each forward."""
        self.handle.remove()
