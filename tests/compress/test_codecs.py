"""Codecs round-trip against numpy references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecoll.compress import (
    CountSketchCodec,
    ParameterQuantizer,
    QuantizeCodec,
    RandomKCodec,
    ThresholdCodec,
    TopKCodec,
    k_for_density,
)
from sparsecoll.errors import InvalidArgumentError


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(0, 3000),
    density=st.sampled_from([0.001, 0.01, 0.1, 1.0]),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    method=st.sampled_from(["fast", "exact"]),
)
def test_topk_codec_keeps_largest_and_decodes_dense(size, density, dtype, method):
    x = np.random.default_rng(size).standard_normal(size).astype(dtype)
    codec = TopKCodec(density, method=method)
    payload = codec.encode(x)
    k = k_for_density(size, density)
    assert payload.count == k and payload.size == size
    dense = codec.decode(payload)
    assert dense.dtype == dtype
    np.testing.assert_array_equal(dense[payload.indices], x[payload.indices])
    assert np.count_nonzero(dense) <= k
    if 0 < k < size:
        assert np.abs(np.delete(x, payload.indices)).max() <= np.abs(payload.values).min()


def test_threshold_codec_fixed_and_density_driven():
    x = np.random.default_rng(0).standard_normal(200_000).astype(np.float32)
    fixed = ThresholdCodec(2.5).encode(x)
    np.testing.assert_array_equal(fixed.indices, np.flatnonzero(np.abs(x) > 2.5))
    estimated = ThresholdCodec(density=0.01).encode(x)
    assert 1400 <= estimated.count <= 2600
    with pytest.raises(InvalidArgumentError):
        ThresholdCodec()


def test_randomk_codec_is_unbiased_and_seeded():
    x = np.random.default_rng(1).standard_normal(200)
    codec = RandomKCodec(0.2, seed=3)
    total = sum(codec.decode(codec.encode(x, step)) for step in range(3000))
    assert np.abs(total / 3000 - x).max() < 0.25
    np.testing.assert_array_equal(codec.encode(x, 5).indices, RandomKCodec(0.2, seed=3).encode(x, 5).indices)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantize_codec_roundtrip_size_and_error(bits):
    x = np.random.default_rng(2).standard_normal(10_000).astype(np.float32)
    codec = QuantizeCodec(bits, block_size=128)
    payload = codec.encode(x)
    assert payload.nbytes == x.size * bits // 8 + 4 * -(-x.size // 128)
    y = codec.decode(payload)
    assert y.dtype == np.float32
    step = 2 * np.abs(x).max() / (1 if bits == 1 else 2**bits - 2)
    assert np.abs(y - x).max() <= step * 1.001


def test_parameter_quantizer_keeps_both_sides_identical_and_tracks_parameters():
    rng = np.random.default_rng(4)
    params = rng.standard_normal(5000)
    sender = ParameterQuantizer(params, 4, seed=1)
    receiver = ParameterQuantizer(params, 4, seed=1)
    for _ in range(20):
        params = params - 0.01 * rng.standard_normal(params.size)
        received = receiver.decode(sender.encode(params))
        np.testing.assert_array_equal(received, sender.reference)
        # error is one quantization step of the change, not of the parameters
        assert np.abs(received - params).max() < 0.02


def test_count_sketch_codec_finds_heavy_hitters_after_merge():
    rng = np.random.default_rng(5)
    size, hot = 100_000, np.array([17, 4242, 99_999])
    parts = [rng.standard_normal(size).astype(np.float32) * 0.01 for _ in range(2)]
    for part in parts:
        part[hot] += 5.0
    codec = CountSketchCodec(5, 5000, seed=9)
    table = codec.merge(codec.encode(parts[0]), codec.encode(parts[1]))
    found = codec.heavy_hitters(table, size, 3)
    np.testing.assert_array_equal(found.indices, hot)
    np.testing.assert_allclose(found.values, (parts[0] + parts[1])[hot], atol=0.2)
    sparse = TopKCodec(0.0001).encode(parts[0])
    np.testing.assert_allclose(
        codec.encode_sparse(sparse), codec.encode(TopKCodec(0.0001).decode(sparse)), atol=1e-5
    )
