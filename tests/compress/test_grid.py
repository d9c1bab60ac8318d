"""LAQ's deterministic grid quantizer against its definition (Sun et al. 2019, eq. (5)-(6))."""

from __future__ import annotations

import numpy as np
import pytest

from sparsecoll.compress.grid import grid_bytes, grid_decode, grid_parts, grid_quantize
from sparsecoll.errors import FrameError, InvalidArgumentError


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("count", [0, 1, 7, 1000])
def test_grid_rounds_to_the_nearest_point_within_tau_r(bits: int, count: int) -> None:
    innovation = np.random.default_rng(count + bits).standard_normal(count).astype(np.float32)
    radius, packed = grid_quantize(innovation, bits)
    assert packed.size + 4 == grid_bytes(count, bits)
    block = radius.tobytes() + packed.tobytes()
    decoded = grid_decode(*grid_parts(block, count, bits), count, bits, np.float64)
    levels = (1 << bits) - 1
    r = float(radius[0])
    if count:
        assert r >= np.abs(innovation).max()
        grid = -r + 2 * r / levels * np.arange(levels + 1)
        nearest = grid[np.argmin(np.abs(innovation[:, None] - grid[None, :]), axis=1)]
        np.testing.assert_allclose(decoded, nearest, rtol=0, atol=1e-6 * r)
        assert np.abs(decoded - innovation).max() <= r / levels * (1 + 1e-6)


def test_grid_refuses_bad_blocks_and_widths() -> None:
    with pytest.raises(InvalidArgumentError, match="bits"):
        grid_quantize(np.ones(4, np.float32), 3)
    with pytest.raises(FrameError):
        grid_parts(b"\x00" * 5, 100, 8)
    with pytest.raises(FrameError, match="radius"):
        grid_parts(np.array([np.nan], np.float32).tobytes() + b"\x00" * 100, 100, 8)
