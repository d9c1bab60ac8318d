"""The host-copy counter: every device<->host staging copy is counted, with its bytes."""

from __future__ import annotations

import numpy as np

from sparsecoll.transport.device import (HostCopies, copy_from_host, host_copies, reset_host_copies,
                                         stage_to_host)
from tests.transport.test_device_buffers import FakeDeviceArray


def test_staging_copies_are_counted_both_ways_and_reset() -> None:
    reset_host_copies()
    assert host_copies() == HostCopies(0, 0, 0)
    staged = stage_to_host(FakeDeviceArray(np.ones(1000, np.float32)))
    copy_from_host(staged[:10], FakeDeviceArray(np.zeros(10, np.float32)))
    count, nbytes, largest = host_copies()
    assert (count, nbytes, largest) == (2, 4040, 4000)
    reset_host_copies()
    assert host_copies().count == 0 and host_copies().bytes == 0
