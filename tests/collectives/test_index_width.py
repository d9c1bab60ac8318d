"""Sparse payloads past 2^31 and 2^32 elements, without allocating such a vector.

The index width follows the vector's size (uint32 below 2^32, int64 from it); indices at and
above 2^31 must come back exact both ways, and an index at or past the size must be refused.
The size is only a number here: the payload holds k pairs, never d values.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparsecoll.collectives.sparse_common import decode_sparse, encode_values
from sparsecoll.errors import FrameError
from sparsecoll.wire import index_dtype, sparse_buffers, sparse_payload_size

CASES = [((1 << 32) - 1, [0, (1 << 31) - 1, 1 << 31, (1 << 32) - 2], np.uint32),
         (1 << 32, [0, 1 << 31, (1 << 32) - 1], np.int64),
         ((1 << 40) + 3, [5, 1 << 32, (1 << 33) + 7, (1 << 40) + 2], np.int64)]


@pytest.mark.parametrize("size, indices, width", CASES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bits", [None, 8])
def test_indices_past_two_to_the_31_round_trip(size: int, indices: list[int], width, dtype, bits) -> None:
    assert index_dtype(size) == np.dtype(width)
    chosen = np.array(indices, np.int64)
    values = np.linspace(-1, 1, chosen.size).astype(dtype)
    wire_values, sent = encode_values(values, bits, seed=3)
    payload = b"".join(np.ascontiguousarray(part).tobytes() for part in sparse_buffers(chosen, wire_values, size))
    assert len(payload) == sparse_payload_size(chosen.size, size, np.dtype(dtype), bits)
    got_indices, got_values = decode_sparse(payload, size, np.dtype(dtype), bits)
    np.testing.assert_array_equal(got_indices, chosen)
    assert got_indices.dtype == np.int64
    np.testing.assert_array_equal(got_values, sent)


@pytest.mark.parametrize("size", [(1 << 32) - 1, (1 << 40) + 3])
def test_an_index_at_or_past_the_size_is_refused(size: int) -> None:
    chosen = np.array([1, size], np.int64)
    payload = b"".join(np.ascontiguousarray(part).tobytes()
                       for part in sparse_buffers(chosen, [np.ones(2, np.float32)], size))
    with pytest.raises(FrameError):
        decode_sparse(payload, size, np.dtype(np.float32), None)
