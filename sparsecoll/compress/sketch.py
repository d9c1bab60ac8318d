"""Count-sketch codec (Sketched-SGD): sketch the gradient, sum sketches, recover heavy hitters."""

from __future__ import annotations

from typing import Any

import numpy as np

from sparsecoll.errors import InvalidArgumentError
from sparsecoll.kernels import (
    sketch_hashes,
    sketch_heavy_hitters,
    sketch_insert_dense,
    sketch_insert_sparse,
    sketch_merge,
)
from sparsecoll.kernels._dispatch import is_cuda_array

from .payload import SparsePayload


class CountSketchCodec:
    """An r x c count sketch whose hashes come from ``seed``; every rank must use the same one.

    ``encode`` gives a table that can be summed across ranks (``merge`` or a dense allreduce);
    ``heavy_hitters`` reads the k coordinates with the largest estimates from a summed table.
    Their exact values are then fetched in a second round, as in Ivkin et al.
    """

    def __init__(self, rows: int, columns: int, *, seed: int = 0, dtype: Any = np.float32) -> None:
        if columns < 1:
            raise InvalidArgumentError(f"columns must be >= 1, not {columns}")
        self.rows = rows
        self.columns = columns
        self.dtype = np.dtype(dtype)
        self.hashes = sketch_hashes(rows, seed)

    def empty_table(self, like: Any = None) -> Any:
        """A zero table, on the device when ``like`` is a CUDA array."""
        table = np.zeros((self.rows, self.columns), self.dtype)
        if like is not None and is_cuda_array(like):
            from numba import cuda

            return cuda.to_device(table)
        return table

    def encode(self, array: Any) -> Any:
        """The sketch of a dense flat vector."""
        return sketch_insert_dense(self.empty_table(array), self.hashes, array)

    def encode_sparse(self, payload: SparsePayload) -> Any:
        """The sketch of a sparse vector (the same table its dense form would give)."""
        table = self.empty_table(payload.values)
        return sketch_insert_sparse(table, self.hashes, payload.indices, payload.values)

    def merge(self, into: Any, other: Any) -> Any:
        """Sums ``other`` into ``into`` (what an allreduce of the tables computes)."""
        return sketch_merge(into, other)

    def heavy_hitters(self, table: Any, size: int, k: int) -> SparsePayload:
        """The k coordinates of ``[0, size)`` with the largest ``|estimate|``, with their estimates."""
        indices, estimates = sketch_heavy_hitters(table, self.hashes, size, k)
        return SparsePayload(indices, estimates, size)
