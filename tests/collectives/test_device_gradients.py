"""Device gradients through the sparse collectives, on real ranks (TCP and UCX) running Numba's
CUDA simulator: the selection kernels run on the (simulated) device and only the k pairs cross
to the host, counted by ``host_copies``; results equal the host gradient's, bit for bit.

The simulator's arrays have no ``__cuda_array_interface__`` (so no transport could mistake them
for host memory either way); what is checked is where the line between device and host is drawn
and how much crosses it, not the speed. The dense collectives reduce on the host: a device array
(the fake of ``tests/transport``, which refuses ``memoryview`` and numpy) is staged there once.
"""

from __future__ import annotations

import numpy as np

from tests.ranks import run_ranks

SIZE, K = 1024, 12
SIMULATOR = {"NUMBA_ENABLE_CUDASIM": "1"}


async def device_and_host(group) -> dict:
    from numba import cuda

    from sparsecoll.transport.device import host_copies, reset_host_copies
    from tests.transport.test_device_buffers import FakeDeviceArray

    grad = np.random.default_rng(group.rank).standard_normal(SIZE).astype(np.float32)
    outcome = {}
    for algorithm in ("gtopk", "allgather", "cltk", "sketch"):
        options = {"k": K, "step": 1}
        host, host_stats = await group.reduce_gradient(grad, algorithm, **options)
        device = cuda.to_device(grad)
        reset_host_copies()
        result, stats = await group.reduce_gradient(device, algorithm, **options)
        copies = host_copies()
        same = (np.array_equal(result.indices, host.indices) and np.array_equal(result.values, host.values)
                and np.array_equal(result.sent_indices, host.sent_indices)
                and np.array_equal(result.sent_values, host.sent_values))
        outcome[algorithm] = (same, stats.bytes_sent == host_stats.bytes_sent, tuple(copies))
    host_total, _ = await group.allreduce(grad)
    reset_host_copies()
    total, _ = await group.allreduce(FakeDeviceArray(grad.copy()))
    outcome["allreduce"] = (np.array_equal(total, host_total), tuple(host_copies()))
    return outcome


def test_sparse_collectives_select_on_the_device_and_move_only_the_pairs(backend: str) -> None:
    ranks = run_ranks(2, device_and_host, timeout=150, env=SIMULATOR)
    pairs = K * (8 + 4)  # int64 indices and float32 values
    for rank, outcome in enumerate(ranks):
        sparse = [outcome[name] for name in ("gtopk", "allgather", "cltk", "sketch")]
        assert all(same and same_bytes for same, same_bytes, _ in sparse), outcome
        assert outcome["gtopk"][2] == (2, pairs, K * 8)
        assert outcome["allgather"][2] == (2, pairs, K * 8)
        # CLT-k: the leader (step 1: rank 1) selects; every rank sends the k indices down and
        # gathers its k values up
        assert outcome["cltk"][2] == ((4, 2 * pairs, K * 8) if rank == 1 else (2, pairs, K * 8))
        # the sketch reduces on the host: the gradient is staged whole, once, and counted
        assert outcome["sketch"][2] == (1, SIZE * 4, SIZE * 4)
        assert outcome["allreduce"] == (True, (1, SIZE * 4, SIZE * 4))
