"""The blocked count-sketch hash: what the count sketch's error bound needs still holds, and
the CPU recovery's 64-coordinate windows read the hot map as a coordinate at a time would."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecoll.kernels import sketch_hashes, sketch_insert_dense, sketch_query
from sparsecoll.kernels._scalar import sketch_block_shift, sketch_bucket, sketch_sign
from sparsecoll.kernels._sketch_scalar import block_hot_bits
from sparsecoll.kernels.sketch import SMALLEST_POSITIVE, _candidates_host


def buckets(hashes: np.ndarray, row: int, coordinates: np.ndarray, columns: int) -> np.ndarray:
    return np.array([sketch_bucket(hashes[row, 0], hashes[row, 1], i, columns) for i in coordinates])


def signs(hashes: np.ndarray, row: int, coordinates: np.ndarray, columns: int) -> np.ndarray:
    return np.array([sketch_sign(hashes[row, 2], hashes[row, 3], i, columns) for i in coordinates])


@pytest.mark.parametrize("columns", [1, 10, 63, 64, 97, 5000])
def test_the_coordinates_of_one_block_never_share_a_column(columns):
    width = 1 << int(sketch_block_shift(columns))
    assert width <= columns and (width == 64 or 2 * width > columns)
    hashes = sketch_hashes(3, 5)
    for block in (0, 1, 12345):
        coordinates = np.arange(block * width, (block + 1) * width)
        for row in range(3):
            assert np.unique(buckets(hashes, row, coordinates, columns)).size == width
            assert np.unique(signs(hashes, row, coordinates, columns)).size == 1


def test_coordinates_of_different_blocks_collide_once_in_columns_with_independent_signs():
    """Pairs (i, i') in different blocks: P(same column) = 1/columns and the product of their
    signs is +1 half the time, as for a hash per coordinate (the count sketch's variance bound)."""
    columns, pairs = 200, 4000
    rng = np.random.default_rng(0)
    first = rng.integers(0, 1 << 30, pairs)
    second = first + 64 * rng.integers(1, 1 << 20, pairs) + rng.integers(-63, 64, pairs)
    collisions = same_sign = 0
    for seed in range(5):
        hashes = sketch_hashes(4, seed)
        for row in range(4):
            collisions += np.count_nonzero(buckets(hashes, row, first, columns) == buckets(hashes, row, second, columns))
            same_sign += np.count_nonzero(signs(hashes, row, first, columns) == signs(hashes, row, second, columns))
    trials = 5 * 4 * pairs  # 80000: expect 400 collisions (sd 20) and 40000 equal signs (sd 141)
    assert abs(collisions - trials / columns) < 5 * np.sqrt(trials / columns)
    assert abs(same_sign - trials / 2) < 5 * np.sqrt(trials / 4)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.data())
def test_a_blocks_hot_window_is_its_columns_bits_wrapping_around_the_row(columns, data):
    words = -(-columns // 32)
    bits = data.draw(st.lists(st.booleans(), min_size=columns, max_size=columns))
    padded = np.zeros(32 * words, np.uint8)
    padded[:columns] = bits
    hot_row = np.packbits(padded.reshape(words, 32)[:, ::-1], axis=1).view(">u4").reshape(-1).astype(np.uint32)
    first = data.draw(st.integers(0, columns - 1))
    count = data.draw(st.integers(1, min(64, columns)))
    window = int(block_hot_bits(hot_row, first, count, columns))
    expected = sum(int(bits[(first + t) % columns]) << t for t in range(count))
    assert window == expected


@pytest.mark.parametrize("size", [40_001, 40_063])
def test_the_candidate_pass_stops_at_the_vector_end_inside_a_block(size):
    """A last, partial block: its columns past the vector's end hold other blocks' values, and
    no coordinate at or past ``size`` may come out as a candidate."""
    x = np.random.default_rng(size).standard_t(2, size).astype(np.float32)
    hashes = sketch_hashes(5, 2)
    table = sketch_insert_dense(np.zeros((5, 4000), np.float32), hashes, x)
    idx, est = _candidates_host(table, hashes, size, SMALLEST_POSITIVE, 0)
    every = sketch_query(table, hashes, np.arange(size))
    np.testing.assert_array_equal(idx, np.flatnonzero(every))
    assert est.tobytes() == every[idx].tobytes()
