"""The torch layer on a GPU: which device and stream a step's work runs on, off the training thread.

A rank's gradients, residual and momentum stay in device memory (see :mod:`.buckets` for the
arrays the collectives see). The reduction of a bucket runs on the group's event-loop thread,
where neither torch nor Numba knows the caller's device or stream, so:

1. :func:`capture`, in the thread that asks for the reduction (the training loop; the autograd
   thread for the DDP hook and for overlapped buckets), notes the tensor's device and torch's
   current stream there;
2. :func:`launching`, in the thread that runs it, makes that device current for torch and
   Numba (else every rank would open a context on GPU 0), makes that stream torch's current one
   (torch's copies and index ops of the step go on it) and launches Numba's kernels on it
   (``cuda.external_stream``). Everything of the step is then ordered on the caller's stream,
   after the backward that produced the gradient, with no event and no device synchronisation;
   the host waits only where k pairs come back to it.

The loop thread runs one rank's buckets, all on the rank's one device; torch's current stream
there is the last one entered, which is the same for every bucket a training thread submits.
Nothing here has run on a GPU yet (none was lent): it is checked on CPU tensors and by the
CUDA simulator for the kernels' stream plumbing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sparsecoll.kernels._dispatch import on_stream


@dataclass(frozen=True)
class Launch:
    """Where a bucket's device work goes: a CUDA device index and a stream handle
    (``cudaStream_t`` as an int, torch's ``cuda_stream``; 0 is the legacy default stream)."""

    device: int
    stream: int


def capture(tensor: torch.Tensor) -> Launch | None:
    """The device ``tensor`` lives on and torch's current stream on it, in this thread; None for
    a tensor that is not on a CUDA device."""
    if tensor.device.type != "cuda":
        return None
    device = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    return Launch(device, torch.cuda.current_stream(device).cuda_stream)


def future_devices(tensor: torch.Tensor) -> list[torch.device]:
    """The ``devices=`` of a ``torch.futures.Future`` completed with ``tensor``: its CUDA device
    (torch then records an event on the current stream at ``set_result`` and makes waiters'
    streams wait on it), none for a CPU tensor."""
    return [tensor.device] if tensor.device.type == "cuda" else []


@contextmanager
def launching(launch: Launch | None) -> Iterator[None]:
    """Step 2 above, for the duration of the context (nothing for None: CPU tensors)."""
    if launch is None:
        yield
        return
    from numba import cuda

    torch.cuda.set_device(launch.device)
    cuda.select_device(launch.device)  # the device's primary context, which torch uses too
    if launch.stream:
        torch_stream = torch.cuda.ExternalStream(launch.stream, device=launch.device)
        numba_stream = cuda.external_stream(launch.stream)
    else:
        torch_stream, numba_stream = torch.cuda.default_stream(launch.device), 0
    with torch.cuda.stream(torch_stream), on_stream(numba_stream):
        yield
