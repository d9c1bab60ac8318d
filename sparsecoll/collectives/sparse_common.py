"""What the sparse collectives share: their result, local selection, quantized values, and a
ring that gathers variable-size byte blocks.

Results are bit-identical on every rank: values are always summed in rank order (or, in
pairwise merges, with a commutative add), never in arrival order.

Device gradients (CUDA arrays: ``__cuda_array_interface__``, or Numba's simulator arrays) draw
the line between device and host here. A collective that reads its gradient only through
:func:`select` and :func:`gather_values` (gTop-k, the sparse allgather, CLT-k) keeps it on the
device: the selection kernels run there and only the k (index, value) pairs cross to the host,
where the wire and the numpy merges are; the others stage it to host whole. Every crossing is
counted (:func:`sparsecoll.transport.device.host_copies`). Inside a bucket's
:func:`~sparsecoll.transport.staging.using_staging` (the torch step) the k pairs and gathered
values cross through the bucket's pinned buffers on a side stream, waiting on an event, not on
the caller's stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from sparsecoll import kernels
from sparsecoll.call import Call
from sparsecoll.errors import InvalidArgumentError
from sparsecoll.kernels._dispatch import as_device_vector, is_cuda_array, launch_stream, to_device, to_host
from sparsecoll.transport.device import count_host_copy
from sparsecoll.transport.staging import current_staging
from sparsecoll.wire import QUANT_BLOCK, Algorithm, sparse_buffers, sparse_payload_size, split_sparse

SELECTIONS = {"topk": Algorithm.TOPK, "topk-exact": Algorithm.TOPK, "threshold": Algorithm.THRESHOLD,
              "randomk": Algorithm.RANDOM_K}


@dataclass
class SparseResult:
    """The reduced gradient and what this rank contributed to it.

    ``indices`` (int64, ascending) and ``values`` (summed over ranks) describe a sparse vector
    of ``size`` elements; ``indices is None`` means ``values`` is the dense sum. For error
    feedback, ``sent_indices``/``sent_values`` are this rank's entries that entered the sum, as
    they entered it (after quantization): the residual is ``grad`` minus those.
    """

    indices: np.ndarray | None
    values: np.ndarray
    size: int
    sent_indices: np.ndarray | None
    sent_values: np.ndarray

    def dense(self, out: np.ndarray | None = None) -> np.ndarray:
        """The reduced gradient as a dense vector (into ``out`` when given)."""
        result = np.zeros(self.size, self.values.dtype) if out is None else out
        if self.indices is None:
            result[...] = self.values
            return result
        if out is not None:
            result.fill(0)
        result[self.indices] = self.values
        return result

    def residual(self, grad: np.ndarray) -> np.ndarray:
        """What this rank did not send: ``grad`` minus its contribution (error feedback)."""
        flat = np.array(grad, copy=True).reshape(-1)
        if self.sent_indices is None:
            flat -= self.sent_values.astype(flat.dtype, copy=False)
        else:
            flat[self.sent_indices] -= self.sent_values.astype(flat.dtype, copy=False)
        return flat


def resolve_k(size: int, k: int | None, density: float | None) -> int:
    """k from an explicit count or a density in (0, 1]."""
    if (k is None) == (density is None):
        raise InvalidArgumentError("give exactly one of k and density")
    if k is None:
        if not 0.0 < density <= 1.0:
            raise InvalidArgumentError(f"density must be in (0, 1], not {density}")
        k = max(1, round(size * density)) if size else 0
    if not 0 <= k <= size:
        raise InvalidArgumentError(f"k={k} is not in [0, {size}]")
    return int(k)


def float_vector(array: np.ndarray, on_device: bool = False) -> np.ndarray:
    """The gradient as a flat contiguous float array (the sparse collectives need floats).

    A device array stays on the device (a flat Numba view, no copy) when the collective says it
    reads it only through :func:`select` and :func:`gather_values` (``on_device``); otherwise it
    is staged to host memory whole (a d-sized copy, counted)."""
    if is_cuda_array(array):
        flat = as_device_vector(array) if on_device else device_to_host(array)
    else:
        flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype.kind != "f" and flat.dtype != ml_dtypes.bfloat16:
        raise InvalidArgumentError(f"sparse collectives need a float gradient, not {flat.dtype}")
    return flat


_PRESELECTED: ContextVar[tuple | None] = ContextVar("sparsecoll_preselected", default=None)


@contextmanager
def preselected(buffer: np.ndarray, k: int, indices: np.ndarray, values: np.ndarray) -> Iterator[None]:
    """Within this context (this task and those it starts), a top-``k`` selection of exactly
    ``buffer`` returns ``(indices, values)`` instead of reading the buffer again: the torch
    layer's fused error-feedback pass found them while it wrote the buffer (they are the set
    ``kernels.topk`` returns). Any other buffer or k selects as usual."""
    token = _PRESELECTED.set((_address(buffer), buffer.size, buffer.dtype, int(k), indices, values))
    try:
        yield
    finally:
        _PRESELECTED.reset(token)


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def _ready_topk(flat: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    ready = _PRESELECTED.get()
    if ready is None or not isinstance(flat, np.ndarray):
        return None
    address, size, dtype, count, indices, values = ready
    if (address, size, dtype, count) != (_address(flat), flat.size, flat.dtype, k):
        return None
    return indices, values


def select(flat: np.ndarray, k: int, selection: str, threshold: float | None,
           density: float | None, seed: int, variance_budget: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """This rank's (indices, values) to contribute, by top-k, threshold or random-k.

    "threshold" without ``threshold`` cuts at a magnitude sampled for ``density`` (Aji &
    Heafield's sampled threshold); "randomk" with ``variance_budget`` keeps Wangni's
    variance-budget form instead of a density. A top-k of a buffer in a :func:`preselected`
    context is the one given there.
    """
    indices, values = _select(flat, k, selection, threshold, density, seed, variance_budget)
    if is_cuda_array(indices):  # a device gradient: only the selected pairs cross to the host
        staging = current_staging()
        if staging is not None:
            indices, values = staging.to_host("selected", launch_stream(), as_device_vector(indices),
                                              as_device_vector(values))
        else:
            indices, values = device_to_host(indices), device_to_host(values)
        indices = np.asarray(indices, np.int64)
    return indices, values


def device_to_host(array) -> np.ndarray:
    """A flat host copy of a device array, made on the kernels' launch stream (torch's current
    one in a training step) and complete on return; counted."""
    host = to_host(as_device_vector(array))
    count_host_copy(host.nbytes)
    return host


def gather_values(flat: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``flat[indices]`` on the host; for a device ``flat`` the k indices go to the device, the
    gather runs there and the k values come back (never the buffer)."""
    if not is_cuda_array(flat):
        return flat[indices]
    device_indices = to_device(np.ascontiguousarray(indices, np.int64))
    count_host_copy(device_indices.size * 8)
    gathered = kernels.gather(flat, device_indices)
    staging = current_staging()
    if staging is None:
        return device_to_host(gathered)
    return staging.to_host("gathered", launch_stream(), as_device_vector(gathered))[0]


def _select(flat, k: int, selection: str, threshold: float | None, density: float | None, seed: int,
            variance_budget: float | None) -> tuple:
    if selection in ("topk", "topk-exact"):
        ready = _ready_topk(flat, k)
        if ready is not None:
            return ready
    if selection == "topk":
        return kernels.topk(flat, k, method="fast", seed=seed) if k else _empty(flat)
    if selection == "topk-exact":
        return kernels.topk(flat, k, method="exact") if k else _empty(flat)
    if selection == "threshold":
        if threshold is None and density is None:
            raise InvalidArgumentError("selection='threshold' needs threshold= or density= (a sampled cut)")
        if threshold is None:
            threshold = kernels.estimate_threshold(flat, resolve_k(flat.size, None, density), seed=seed)
        return kernels.select_threshold(flat, threshold)
    if selection == "randomk":
        if density is None and variance_budget is None:
            raise InvalidArgumentError("selection='randomk' needs density= or variance_budget=")
        if variance_budget is not None:
            return kernels.random_sparsify(flat, seed=seed, variance_budget=variance_budget)
        return kernels.random_sparsify(flat, density, seed=seed)
    raise InvalidArgumentError(f"unknown selection {selection!r}; choose from {sorted(SELECTIONS)}")


def _empty(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.empty(0, np.int64), np.empty(0, np.dtype(flat.dtype))


def encode_values(values: np.ndarray, bits: int | None, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Wire form of ``values`` and the values a receiver will decode from it."""
    if not bits:
        return [values], values
    if values.size == 0:
        return [np.empty(0, np.float32), np.empty(0, np.uint8)], values
    packed, scales = kernels.quantize(values, bits, block_size=QUANT_BLOCK, seed=seed)
    decoded = kernels.dequantize(packed, scales, bits, values.size, block_size=QUANT_BLOCK,
                                 dtype=values.dtype)
    return [scales, packed], decoded


def decode_values(parts: list[np.ndarray], count: int, bits: int | None, dtype: np.dtype) -> np.ndarray:
    """Values of a received sparse payload (dequantized when ``bits`` is set)."""
    if not bits:
        return parts[0]
    if count == 0:
        return np.empty(0, dtype)
    scales, packed = parts
    return kernels.dequantize(packed, scales, bits, count, block_size=QUANT_BLOCK, dtype=dtype)


def decode_sparse(payload, size: int, dtype: np.dtype, bits: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(indices, values) of a received sparse payload; FrameError if it is malformed."""
    indices, parts = split_sparse(payload, size, dtype, bits)
    return indices, decode_values(parts, indices.size, bits, dtype)


def payload_limit(count: int, size: int, dtype: np.dtype, bits: int | None) -> int:
    """Largest sparse payload of at most ``count`` pairs: what a receive may accept."""
    return sparse_payload_size(count, size, dtype, bits)


async def ring_gather_blocks(call: Call, own: list[np.ndarray], limit: int, tag_base: int = 0) -> list:
    """Every rank's block of bytes, in rank order, by a ring (each block forwarded P-1 times).

    ``own`` is this rank's block as a list of buffers (sent gathered, not concatenated);
    received blocks are accepted up to ``limit`` bytes.
    """
    size, rank = call.size, call.rank
    right, left = (rank + 1) % size, (rank - 1) % size
    blocks: list = [None] * size
    blocks[rank] = own
    for step in range(size - 1):
        outgoing = blocks[(rank - step) % size]
        received = await call.exchange(right, outgoing if isinstance(outgoing, list) else [outgoing],
                                       left, None, tag_base + step, limit)
        blocks[(rank - step - 1) % size] = received
    call.stats.rounds += size - 1
    return blocks


def own_block(indices: np.ndarray, wire_values: list[np.ndarray], size: int) -> list[np.ndarray]:
    """This rank's sparse payload as buffers."""
    return sparse_buffers(indices, wire_values, size)


def sum_in_rank_order(parts: list[tuple[np.ndarray, np.ndarray]], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Union of indices and values summed rank by rank (deterministic on every rank).

    Each part's indices are ascending, so a chain of linear merges does it; numpy's
    ``unique`` (hash-based in numpy 2) was 10x slower here.
    """
    if not parts:
        return np.empty(0, np.int64), np.empty(0, dtype)
    indices, values = parts[0]
    for more_indices, more_values in parts[1:]:
        indices, values = kernels.merge_sorted(indices, values, more_indices, more_values)
    return np.asarray(indices, np.int64), np.asarray(values, dtype)
