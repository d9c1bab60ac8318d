"""Threshold sparsification (Aji & Heafield 2017): send every entry with |g| above a cut."""

from __future__ import annotations

from typing import Any

from sparsecoll.errors import InvalidArgumentError
from sparsecoll.kernels import estimate_threshold, select_threshold

from .payload import SparsePayload, densify


class ThresholdCodec:
    """Keeps ``|x| > threshold``; with ``density`` instead, the cut is estimated from a sample.

    A fixed threshold sends a varying count; a density-driven cut (DGC) sends about
    ``density * size`` entries for one sample and one pass.
    """

    def __init__(
        self, threshold: float | None = None, *, density: float | None = None, seed: int = 0
    ) -> None:
        if (threshold is None) == (density is None):
            raise InvalidArgumentError("give exactly one of threshold and density")
        if density is not None and not 0.0 < density <= 1.0:
            raise InvalidArgumentError(f"density must be in (0, 1], not {density}")
        self.threshold = threshold
        self.density = density
        self.seed = seed

    def cut_for(self, array: Any) -> float:
        """The magnitude this codec cuts ``array`` at."""
        if self.threshold is not None:
            return float(self.threshold)
        size = int(array.size)
        return estimate_threshold(array, min(size, max(1, round(size * self.density))), seed=self.seed)

    def encode(self, array: Any) -> SparsePayload:
        """The entries of the flattened array above the cut."""
        indices, values = select_threshold(array, self.cut_for(array))
        return SparsePayload(indices, values, int(array.size))

    def decode(self, payload: SparsePayload) -> Any:
        """The dense vector with the kept entries and zeros elsewhere."""
        return densify(payload)
