"""Wangni et al.'s variance-budget random sparsification: E||Q(g)||^2 <= (1 + eps) ||g||^2."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecoll import kernels
from sparsecoll.errors import InvalidArgumentError
from sparsecoll.kernels.random_sparsify import budget_scale, scale_sums


def keep_probabilities(grad: np.ndarray, eps: float) -> np.ndarray:
    lam = budget_scale(lambda scale: scale_sums(grad, scale), eps)
    return np.minimum(1.0, lam * np.abs(grad.astype(np.float64)))


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 3000), eps=st.sampled_from([0.05, 0.5, 2.0, 20.0]), seed=st.integers(0, 2**16))
def test_the_closed_form_meets_the_budget_exactly(size: int, eps: float, seed: int) -> None:
    grad = np.random.default_rng(seed).standard_t(2, size)
    probabilities = keep_probabilities(grad, eps)
    kept = probabilities > 0
    variance = float(np.sum(grad[kept] ** 2 / probabilities[kept]))
    norm = float(np.sum(grad ** 2))
    # equality unless every coordinate is kept for sure (then the variance is ||g||^2 itself)
    if probabilities.min() < 1:
        assert variance == pytest.approx((1 + eps) * norm, rel=1e-9)
    assert variance <= (1 + eps) * norm * (1 + 1e-9)
    # the fewest: a smaller lam would break the budget
    smaller = np.minimum(1.0, 0.99 * probabilities)
    assert probabilities.min() == 1 or float(np.sum(grad[kept] ** 2 / smaller[kept])) > (1 + eps) * norm


@pytest.mark.parametrize("eps", [0.1, 1.0, 10.0])
def test_the_budget_holds_in_expectation_over_draws(eps: float) -> None:
    grad = np.random.default_rng(1).standard_t(3, 2000).astype(np.float64)
    norm = float(np.sum(grad ** 2))
    draws = 200
    total = np.zeros_like(grad)
    squares = []
    for seed in range(draws):
        indices, values = kernels.random_sparsify(grad, seed=seed, variance_budget=eps)
        total[indices] += values
        squares.append(float(np.sum(values ** 2)))
    mean_square = np.mean(squares)
    spread = np.std(squares) / np.sqrt(draws)
    assert mean_square <= (1 + eps) * norm + 4 * spread, (mean_square, (1 + eps) * norm)
    assert mean_square >= (1 + eps) * norm - 4 * spread  # the budget is spent, not undershot
    # unbiased: the mean of the draws approaches g (per-coordinate error within 5 sigma)
    variance = np.where(keep_probabilities(grad, eps) > 0, grad ** 2 / keep_probabilities(grad, eps) - grad ** 2, 0)
    assert np.all(np.abs(total / draws - grad) <= 5 * np.sqrt(variance / draws) + 1e-12)
    # a bigger budget keeps fewer coordinates
    assert keep_probabilities(grad, eps).sum() > keep_probabilities(grad, 2 * eps).sum()


def test_exactly_one_of_density_and_budget() -> None:
    grad = np.ones(10, np.float32)
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        kernels.random_sparsify(grad, 0.5, variance_budget=1.0)
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        kernels.random_sparsify(grad)
    with pytest.raises(InvalidArgumentError, match="variance_budget"):
        kernels.random_sparsify(grad, variance_budget=-1.0)
    with pytest.raises(InvalidArgumentError, match="NaN"):
        kernels.random_sparsify(np.array([1.0, np.nan]), variance_budget=1.0)
