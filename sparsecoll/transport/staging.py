"""Small device-to-host copies that recur every step (a bucket's k index and value pairs), made
without a per-step allocation and without synchronising the caller's stream.

A :class:`HostStaging` belongs to one bucket (the torch layer keeps it with the bucket's
error-feedback memory) and keeps, between steps, pinned host buffers (one per label: the
selected pairs, the gathered values), a side stream and two events. :meth:`HostStaging.to_host`

1. finds (or grows, by doubling) the label's pinned buffer and cuts one view per array from it;
2. records an event on the caller's stream (the kernels' launch stream, torch's current stream
   in a step), after the kernels that wrote the arrays;
3. makes the side stream wait on that event and copies the arrays on it (pinned memory: true
   asynchronous DMA, while the caller's stream goes on with its own work);
4. records a second event on the side stream and waits on that event only: the host blocks
   until these copies are done, not until everything queued on the device is.

This holds over UCX as over TCP: the sparse collectives merge the pairs with numpy on the host,
so the pairs come to host memory whatever the transport (device-resident merges that would let
UCX carry them straight from device memory are not built).

The views it returns stay valid until the label's next copy (the bucket's next step), so
callers that keep results across steps copy them (the lazy state does). The CUDA runtime
(``numba.cuda``: ``stream``, ``event``, ``pinned_array``) is an argument, so the simulator
and a recording fake drive the same code. Which copies go through a staging is chosen by
:func:`using_staging` (a context, like ``on_stream``); a device array outside one is copied
as before (``sparse_common.device_to_host``: pageable, on the launch stream, then that stream
synchronised). Every copy is counted (:func:`sparsecoll.transport.device.host_copies`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np

from sparsecoll.transport.device import count_host_copy

ALIGNMENT = 64
"""Each view starts at a multiple of this many bytes in its buffer (any dtype's alignment)."""


class HostStaging:
    """One bucket's pinned host buffers, side stream and events, kept between steps (see the
    module docstring). ``runtime`` is ``numba.cuda`` unless a test gives another."""

    __slots__ = ("_runtime", "_buffers", "_side", "_selected", "_copied", "allocations")

    def __init__(self, runtime: Any = None) -> None:
        self._runtime = runtime
        self._buffers: dict[str, np.ndarray] = {}
        self._side: Any = None
        self._selected: Any = None
        self._copied: Any = None
        self.allocations = 0
        """Pinned buffers allocated so far (a steady step allocates none)."""

    def runtime(self) -> Any:
        """The CUDA runtime the copies go through (``numba.cuda`` on first use)."""
        if self._runtime is None:
            from numba import cuda

            self._runtime = cuda
        return self._runtime

    def views(self, label: str, arrays: tuple[Any, ...]) -> list[np.ndarray]:
        """Step 1: a flat host view per array, of its dtype and size, in the label's buffer."""
        offsets, end = [], 0
        for array in arrays:
            offsets.append(end)
            end += -(-array.size * np.dtype(array.dtype).itemsize // ALIGNMENT) * ALIGNMENT
        buffer = self._buffers.get(label)
        if buffer is None or buffer.size < end:
            grown = max(end, 2 * (0 if buffer is None else buffer.size), ALIGNMENT)
            buffer = self._buffers[label] = self.runtime().pinned_array(grown, np.uint8)
            self.allocations += 1
        return [buffer[offset:offset + array.size * np.dtype(array.dtype).itemsize].view(np.dtype(array.dtype))
                for offset, array in zip(offsets, arrays)]

    def streams(self) -> tuple[Any, Any, Any]:
        """The side stream and the two events, made on first use (in the bucket's device context)."""
        if self._side is None:
            runtime = self.runtime()
            self._side, self._selected, self._copied = runtime.stream(), runtime.event(), runtime.event()
        return self._side, self._selected, self._copied

    def to_host(self, label: str, source: Any, *arrays: Any) -> tuple[np.ndarray, ...]:
        """Host copies of flat device ``arrays``, written after the work queued on the stream
        ``source`` (0: the default stream), by steps 1-4 above; valid until ``label``'s next copy."""
        hosts = self.views(label, arrays)
        side, selected, copied = self.streams()
        selected.record(source)
        selected.wait(side)
        for array, host in zip(arrays, hosts):
            array.copy_to_host(host, stream=side)
        copied.record(side)
        copied.synchronize()
        for host in hosts:
            count_host_copy(host.nbytes)
        return tuple(hosts)


_STAGING: ContextVar[HostStaging | None] = ContextVar("sparsecoll_host_staging", default=None)


def current_staging() -> HostStaging | None:
    """The staging :func:`using_staging` set for this task, else None."""
    return _STAGING.get()


@contextmanager
def using_staging(staging: HostStaging | None) -> Iterator[None]:
    """Within this context (this task and the tasks it starts), the collectives' k-sized
    device-to-host copies go through ``staging`` (None: as outside any)."""
    token = _STAGING.set(staging)
    try:
        yield
    finally:
        _STAGING.reset(token)
