"""Top-k sparsification (Aji & Heafield; the selection of gTop-k and DGC)."""

from __future__ import annotations

from typing import Any

from sparsecoll.errors import InvalidArgumentError
from sparsecoll.kernels import topk

from .payload import SparsePayload, densify


def k_for_density(size: int, density: float) -> int:
    """k for a density in (0, 1]: at least one element of a non-empty vector."""
    if not 0.0 < density <= 1.0:
        raise InvalidArgumentError(f"density must be in (0, 1], not {density}")
    return min(size, max(1 if size else 0, round(size * density)))


class TopKCodec:
    """Keeps the ``density`` fraction of largest-magnitude entries.

    ``method="fast"`` estimates the threshold from a sample (``"exact"`` selects exactly);
    ``approximate=True`` keeps everything above the estimate, about k entries, as DGC does.
    """

    def __init__(
        self, density: float, *, method: str = "fast", approximate: bool = False, seed: int = 0
    ) -> None:
        k_for_density(1, density)
        self.density = density
        self.method = method
        self.approximate = approximate
        self.seed = seed

    def encode(self, array: Any) -> SparsePayload:
        """The top-k entries of the flattened array."""
        size = int(array.size)
        k = k_for_density(size, self.density)
        indices, values = topk(
            array, k, method=self.method, approximate=self.approximate, seed=self.seed
        )
        return SparsePayload(indices, values, size)

    def decode(self, payload: SparsePayload) -> Any:
        """The dense vector with the kept entries and zeros elsewhere."""
        return densify(payload)
