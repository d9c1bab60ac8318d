"""Numba kernels for sparse and compressed collectives, on CPU (``@njit``) and CUDA (``@cuda.jit``).

Each public function takes numpy arrays (CPU kernels) or CUDA arrays (cupy, torch CUDA tensors,
Numba device arrays: GPU kernels) and returns results of the same kind. Sparse results are
``(indices, values)`` with int64 indices sorted ascending. Importing this package needs no GPU:
``numba.cuda`` is imported when a CUDA array first arrives.
"""

from . import _cache

_cache.install()  # before any kernel below is decorated: their cache follows every kernel source

from .quantize import SUPPORTED_BITS, dequantize, packed_size, quantize
from .random_sparsify import random_sparsify
from .select import estimate_threshold, select_threshold, topk, topk_exact, topk_fast
from .sketch import (
    sketch_hashes,
    sketch_heavy_hitters,
    sketch_insert_dense,
    sketch_insert_sparse,
    sketch_merge,
    sketch_query,
)
from .sparse import gather, merge_sorted, scatter_add, topk_sparse

__all__ = [
    "SUPPORTED_BITS",
    "dequantize",
    "estimate_threshold",
    "gather",
    "merge_sorted",
    "packed_size",
    "quantize",
    "random_sparsify",
    "scatter_add",
    "select_threshold",
    "sketch_hashes",
    "sketch_heavy_hitters",
    "sketch_insert_dense",
    "sketch_insert_sparse",
    "sketch_merge",
    "sketch_query",
    "topk",
    "topk_exact",
    "topk_fast",
    "topk_sparse",
]
