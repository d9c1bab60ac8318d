"""What codecs produce: a sparse vector, or bit-packed codes with per-block scales.

Payloads are plain arrays plus the few numbers needed to rebuild the dense vector; the wire
layer turns them into frames, these classes know nothing of sockets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sparsecoll.kernels import scatter_add
from sparsecoll.kernels._dispatch import is_cuda_array, wrap_like


@dataclass(frozen=True)
class SparsePayload:
    """``values`` at ``indices`` (int64, ascending) of a flat vector of ``size`` elements."""

    indices: Any
    values: Any
    size: int

    @property
    def count(self) -> int:
        """Number of (index, value) pairs carried."""
        return int(self.indices.size)


@dataclass(frozen=True)
class QuantizedPayload:
    """``bits``-bit codes packed into bytes, one float32 scale per ``block_size`` values."""

    packed: Any
    scales: Any
    bits: int
    block_size: int
    size: int
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of codes and scales (what goes on the wire besides the header)."""
        return int(self.packed.size) + 4 * int(self.scales.size)


def densify(payload: SparsePayload, dtype: Any = None) -> Any:
    """The dense vector a sparse payload stands for (zeros elsewhere), on the payload's device."""
    out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(payload.values.dtype)
    if is_cuda_array(payload.values):
        from numba import cuda

        dense = cuda.to_device(np.zeros(payload.size, out_dtype))
        scatter_add(dense, payload.indices, payload.values)
        return wrap_like(payload.values, dense)
    dense = np.zeros(payload.size, out_dtype)
    return scatter_add(dense, payload.indices, payload.values)
