"""The collectives' device selection through a bucket's :class:`HostStaging`, on ``numba.cuda``
itself (pinned arrays, streams, events): run by ``test_staging.py`` in a subprocess under the
CUDA simulator (not collected by a plain ``pytest``). The simulator runs streams synchronously,
so this checks the values, the counting and the reuse of the pinned buffers; the order of the
stream operations is checked with a recording runtime in ``test_staging.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

from sparsecoll.collectives.sparse_common import gather_values, select
from sparsecoll.transport.device import host_copies, reset_host_copies
from sparsecoll.transport.staging import HostStaging, using_staging

if not cuda.is_available():
    pytest.skip("neither a CUDA device nor the simulator is available", allow_module_level=True)

SIZE, K = 512, 8


def test_pairs_and_gathered_values_land_in_the_buckets_pinned_buffers_step_after_step() -> None:
    rng = np.random.default_rng(5)
    gradients = [rng.standard_normal(SIZE).astype(np.float32) for _ in range(2)]
    staging = HostStaging()
    landed = []
    for host in gradients:
        expected_indices, expected_values = select(host, K, "topk", None, None, 1)
        reset_host_copies()
        with using_staging(staging):
            indices, values = select(cuda.to_device(host), K, "topk", None, None, 1)
        assert tuple(host_copies()) == (2, K * (8 + 4), K * 8)
        assert indices.dtype == np.int64 and np.array_equal(indices, expected_indices)
        assert np.array_equal(values, expected_values)
        landed.append(indices)
    assert staging.allocations == 1 and np.shares_memory(landed[0], landed[1])  # no allocation a step

    chosen = np.array([3, 70, 500], np.int64)
    with using_staging(staging):
        gathered = gather_values(cuda.to_device(gradients[1]), chosen)
    assert np.array_equal(gathered, gradients[1][chosen]) and staging.allocations == 2
    assert not np.shares_memory(gathered, landed[1])

    outside, _ = select(cuda.to_device(gradients[0]), K, "topk", None, None, 1)  # no staging: a copy of its own
    assert np.array_equal(outside, select(gradients[0], K, "topk", None, None, 1)[0])
    assert not np.shares_memory(outside, landed[1]) and staging.allocations == 2
