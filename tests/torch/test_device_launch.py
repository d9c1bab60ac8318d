"""The torch layer's device decisions that run without a GPU: CPU tensors take no device
context and no counted copy; a result bound for another device is counted when it crosses.

A CUDA tensor cannot be made here (torch is a CPU build); ``meta`` tensors stand in for "not
host memory" where only the device type matters.
"""

from __future__ import annotations

import numpy as np
import torch

from sparsecoll.torch.buckets import as_array, to_tensor
from sparsecoll.torch.device_launch import capture, future_devices, launching
from sparsecoll.transport.device import host_copies, reset_host_copies


def test_cpu_tensors_need_no_device_context_and_cross_nothing() -> None:
    tensor = torch.arange(6, dtype=torch.float32)
    assert capture(tensor) is None and future_devices(tensor) == []
    with launching(None):
        pass
    reset_host_copies()
    array = as_array(tensor)
    array[0] = 7.0  # a view of the tensor's memory
    back = to_tensor(np.arange(3, dtype=np.float32), tensor)
    assert tensor[0] == 7.0 and back.tolist() == [0.0, 1.0, 2.0]
    assert tuple(host_copies()) == (0, 0, 0)


def test_results_for_another_device_are_counted_as_they_cross() -> None:
    like = torch.empty(0, device="meta")
    reset_host_copies()
    moved = to_tensor(np.arange(5, dtype=np.int64), like)
    assert moved.device.type == "meta" and tuple(host_copies()) == (1, 40, 40)
