"""Wangni et al. random sparsification: greedy probabilities, expected density, unbiasedness."""

from __future__ import annotations

import numpy as np
import pytest

from sparsecoll.errors import InvalidArgumentError
from sparsecoll.kernels import random_sparsify
from sparsecoll.kernels.random_sparsify import greedy_scale, scale_sums


def test_greedy_probabilities_sum_to_target():
    x = np.random.default_rng(0).standard_cauchy(100_000)
    for density in (0.001, 0.01, 0.3):
        lam = greedy_scale(lambda s: scale_sums(x, s), x.size, density)
        probabilities = np.minimum(1.0, lam * np.abs(x))
        assert probabilities.sum() == pytest.approx(density * x.size, rel=1e-6)


def test_kept_count_is_near_target_and_seeded():
    x = np.random.default_rng(1).standard_normal(200_000).astype(np.float32)
    idx, val = random_sparsify(x, 0.01, seed=4)
    assert abs(idx.size - 2000) < 5 * np.sqrt(2000)
    assert np.all(np.diff(idx) > 0) and val.dtype == np.float32
    np.testing.assert_array_equal(idx, random_sparsify(x, 0.01, seed=4)[0])
    assert not np.array_equal(idx, random_sparsify(x, 0.01, seed=5)[0])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_sparsification_is_unbiased(dtype):
    x = (np.random.default_rng(2).standard_normal(300) * np.linspace(0.1, 3, 300)).astype(dtype)
    lam = greedy_scale(lambda s: scale_sums(x.astype(np.float64), s), x.size, 0.1)
    p = np.minimum(1.0, lam * np.abs(x.astype(np.float64)))
    trials = 2000
    total = np.zeros(x.size)
    for seed in range(trials):
        idx, val = random_sparsify(x, 0.1, seed=seed)
        total[idx] += val.astype(np.float64)
    mean = total / trials
    x64 = x.astype(np.float64)
    sigma = np.abs(x64) * np.sqrt((1 - p) / p) / np.sqrt(trials)  # std of the mean of g/p * Bernoulli(p)
    assert np.all(np.abs(mean - x64) <= 5 * sigma + 2e-3 * np.abs(x64))


def test_density_one_keeps_every_nonzero_unscaled():
    x = np.array([0.0, 1.0, -2.0, 0.0, 3.0])
    idx, val = random_sparsify(x, 1.0)
    np.testing.assert_array_equal(idx, [1, 2, 4])
    np.testing.assert_array_equal(val, [1.0, -2.0, 3.0])


def test_bad_input_raises():
    with pytest.raises(InvalidArgumentError):
        random_sparsify(np.ones(4), 0.0)
    with pytest.raises(InvalidArgumentError, match="NaN or inf"):
        random_sparsify(np.array([1.0, np.nan]), 0.5)
    idx, val = random_sparsify(np.zeros(0), 0.5)
    assert idx.size == 0
