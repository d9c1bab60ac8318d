"""Stochastic quantization: packing layout, error bounds, and statistical unbiasedness."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecoll.errors import InvalidArgumentError
from sparsecoll.kernels import dequantize, packed_size, quantize
from sparsecoll.kernels.quantize import grid_steps


@settings(max_examples=80, deadline=None)
@given(
    size=st.sampled_from([0, 1, 7, 8, 255, 257, 1000]) | st.integers(0, 3000),
    bits=st.sampled_from([1, 2, 4, 8]),
    block=st.sampled_from([8, 64, 256]),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    seed=st.integers(0, 2**40),
)
def test_roundtrip_stays_within_one_grid_step(size, bits, block, dtype, seed):
    x = (np.random.default_rng(seed % 1000).standard_normal(size) * 3).astype(dtype)
    packed, scales = quantize(x, bits, block_size=block, seed=seed)
    assert packed.dtype == np.uint8 and packed.size == packed_size(size, bits)
    assert scales.dtype == np.float32 and scales.size == -(-size // block)
    y = dequantize(packed, scales, bits, size, block_size=block, dtype=dtype)
    assert y.dtype == dtype and y.shape == (size,)
    step = 2 * np.repeat(scales, block)[:size].astype(np.float64) / grid_steps(bits)
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    assert np.all(err <= step * (1 + 1e-3) + 1e-2 * (dtype == np.float16) * np.abs(x))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantization_is_unbiased(bits):
    x = np.random.default_rng(0).standard_normal(512) * np.linspace(0.1, 2, 512)
    trials = 400
    total = np.zeros_like(x)
    for seed in range(trials):
        packed, scales = quantize(x, bits, block_size=64, seed=seed)
        total += dequantize(packed, scales, bits, x.size, block_size=64, dtype=np.float64)
    mean = total / trials
    scale = np.repeat(np.abs(x).reshape(-1, 64).max(axis=1), 64)
    # the error of one draw is at most one grid step, so its std is at most step / 2
    sigma = (2 * scale / grid_steps(bits)) / 2 / np.sqrt(trials)
    assert np.all(np.abs(mean - x) <= 5 * sigma + 1e-12)
    # and the mean error over all coordinates is far below any one coordinate's noise
    assert abs(np.mean(mean - x)) <= 5 * np.sqrt(np.mean(sigma**2) / x.size)


def test_quantization_is_biased_without_randomness_check():
    """Guards the test above: a deterministic rounding would fail its bound."""
    x = np.full(64, 0.3)
    x[0] = 1.0
    packed, scales = quantize(x, 1, block_size=64, seed=0)
    y = dequantize(packed, scales, 1, 64, block_size=64, dtype=np.float64)
    assert set(np.unique(y)) <= {-1.0, 1.0}


def test_zero_is_exact_for_two_bits_and_more():
    x = np.zeros(64)
    x[3] = 2.0
    for bits in (2, 4, 8):
        packed, scales = quantize(x, bits, block_size=64, seed=1)
        y = dequantize(packed, scales, bits, 64, block_size=64, dtype=np.float64)
        np.testing.assert_array_equal(y, x)


def test_same_seed_same_codes_and_different_seed_different_codes():
    x = np.random.default_rng(1).standard_normal(1000)
    a = quantize(x, 2, seed=5)[0]
    np.testing.assert_array_equal(a, quantize(x, 2, seed=5)[0])
    assert not np.array_equal(a, quantize(x, 2, seed=6)[0])


def test_bad_arguments_raise():
    x = np.ones(16, np.float32)
    with pytest.raises(InvalidArgumentError):
        quantize(x, 3)
    with pytest.raises(InvalidArgumentError):
        quantize(x, 4, block_size=12)
    x[2] = np.nan
    with pytest.raises(InvalidArgumentError, match="NaN or inf"):
        quantize(x, 4)
    packed, scales = quantize(np.ones(16), 4)
    with pytest.raises(InvalidArgumentError):
        dequantize(packed, scales, 4, 17)
