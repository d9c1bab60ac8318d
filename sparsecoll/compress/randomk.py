"""Unbiased random sparsification (Wangni et al. 2018) as a codec."""

from __future__ import annotations

from typing import Any

from sparsecoll.errors import InvalidArgumentError
from sparsecoll.kernels import random_sparsify

from .payload import SparsePayload, densify


class RandomKCodec:
    """Keeps about ``density * size`` entries at random, scaled by 1/p so decode is unbiased.

    The coin flips of ``encode(array, step)`` come from ``(seed, step)``: ranks that share the
    seed and step flip the same coins, and successive steps flip fresh ones.
    """

    def __init__(self, density: float, *, seed: int = 0) -> None:
        if not 0.0 < density <= 1.0:
            raise InvalidArgumentError(f"density must be in (0, 1], not {density}")
        self.density = density
        self.seed = seed

    def encode(self, array: Any, step: int = 0) -> SparsePayload:
        """A random sparse, unbiased estimate of the flattened array."""
        stream = (self.seed * 0x9E3779B1 + step) & 0xFFFFFFFFFFFFFFFF
        indices, values = random_sparsify(array, self.density, seed=stream)
        return SparsePayload(indices, values, int(array.size))

    def decode(self, payload: SparsePayload) -> Any:
        """The dense vector (zeros where nothing was kept)."""
        return densify(payload)
