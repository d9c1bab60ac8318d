"""Unbiased random sparsification (Wangni et al. 2018) as a codec."""

from __future__ import annotations

from typing import Any

from sparsecoll.kernels import random_sparsify
from sparsecoll.kernels.random_sparsify import check_budget

from .payload import SparsePayload, densify


class RandomKCodec:
    """Keeps about ``density * size`` entries at random, scaled by 1/p so decode is unbiased.

    With ``variance_budget`` (eps) the keep probabilities follow Wangni et al.'s closed form
    instead: the fewest expected entries with ``E||decode||^2 <= (1 + eps) ||x||^2`` (the budget
    replaces the density). The coin flips of ``encode(array, step)`` come from ``(seed, step)``:
    ranks that share the seed and step flip the same coins, and successive steps flip fresh ones.
    Being unbiased and not contractive, it takes no error feedback (``unbiased``).
    """

    unbiased = True
    """Error feedback diverges with it: SparseCollOptimizer and the DDP hook refuse the pair."""

    def __init__(self, density: float | None = None, *, seed: int = 0, variance_budget: float | None = None) -> None:
        if variance_budget is not None:
            density = None
        check_budget(density, variance_budget)
        self.density = density
        self.variance_budget = variance_budget
        self.seed = seed

    def encode(self, array: Any, step: int = 0) -> SparsePayload:
        """A random sparse, unbiased estimate of the flattened array."""
        stream = (self.seed * 0x9E3779B1 + step) & 0xFFFFFFFFFFFFFFFF
        indices, values = random_sparsify(array, self.density, seed=stream, variance_budget=self.variance_budget)
        return SparsePayload(indices, values, int(array.size))

    def decode(self, payload: SparsePayload) -> Any:
        """The dense vector (zeros where nothing was kept)."""
        return densify(payload)
