"""Arrays that speak only DLPack (``__dlpack__``/``__dlpack_device__``: no numpy form, no
``__cuda_array_interface__``) are taken where they enter the group, as a user of cupy or ucxx
expects: a CPU one as a numpy view of the same memory (results written into an ``out=`` land in
the caller's array), a CUDA one through cupy's or torch's ``from_dlpack`` (no copy), and any
other device refused with a clear error that says what is taken.

The DLPack producer is real (a CPU torch tensor); a thin wrapper hides its other interfaces so
that it poses as a DLPack-only array. No CUDA ``from_dlpack`` exists here (CPU torch, no cupy):
a CUDA DLPack array is checked to reach the first importer given, with the fake device array of
``test_device_buffers`` standing in for what cupy would return.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from sparsecoll.errors import InvalidArgumentError
from sparsecoll.group import init_group
from sparsecoll.transport import device
from sparsecoll.transport.device import adopt_dlpack, host_copies, reset_host_copies
from tests.transport.test_device_buffers import FakeDeviceArray


class DLPackOnly:
    """Only the DLPack protocol of ``inner`` (a torch tensor or numpy array)."""

    def __init__(self, inner: Any, device: tuple[int, int] | None = None) -> None:
        self.inner, self.device = inner, device

    def __dlpack__(self, **options: Any) -> Any:
        return self.inner.__dlpack__(**options)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.device or self.inner.__dlpack_device__()


def test_host_dlpack_arrays_become_numpy_views_and_others_are_left_alone() -> None:
    tensor = torch.arange(6, dtype=torch.float32)
    adopted = adopt_dlpack(DLPackOnly(tensor))
    assert isinstance(adopted, np.ndarray) and adopted.flags.writeable and adopted.dtype == np.float32
    adopted[0] = 42.0
    assert tensor[0] == 42.0  # the same memory, no copy
    host = np.arange(3)
    assert np.shares_memory(adopt_dlpack(DLPackOnly(host)), host)
    with pytest.raises(InvalidArgumentError, match="numpy cannot import this host DLPack array .*Unsupported dtype"):
        adopt_dlpack(DLPackOnly(torch.zeros(2, dtype=torch.bfloat16)))  # numpy's DLPack import has no bfloat16
    with pytest.raises(InvalidArgumentError, match="require gradient"):
        adopt_dlpack(DLPackOnly(torch.zeros(2, requires_grad=True)))
    fake = FakeDeviceArray(np.zeros(2))
    for taken in (host, tensor, fake, None, b"bytes"):
        assert adopt_dlpack(taken) is taken


def test_cuda_dlpack_arrays_go_to_the_first_importer_and_other_devices_are_refused(monkeypatch) -> None:
    on_cuda = DLPackOnly(torch.arange(4, dtype=torch.float32), device=(device.DLPACK_CUDA, 1))
    imported: list = []
    monkeypatch.setattr(device, "cuda_dlpack_importers",
                        lambda: [lambda array: imported.append(array) or FakeDeviceArray(np.ones(4, np.float32)),
                                 lambda array: pytest.fail("only the first importer is used")])
    result = adopt_dlpack(on_cuda)
    assert imported == [on_cuda] and isinstance(result, FakeDeviceArray)
    def refusing(array: Any) -> Any:
        raise RuntimeError("Unsupported dtype in DLTensor.")  # e.g. a dtype the importer lacks

    monkeypatch.setattr(device, "cuda_dlpack_importers", lambda: [refusing])
    with pytest.raises(InvalidArgumentError, match="could not be imported .*Unsupported dtype"):
        adopt_dlpack(on_cuda)
    monkeypatch.setattr(device, "cuda_dlpack_importers", lambda: [])
    with pytest.raises(InvalidArgumentError, match="CUDA device 1 needs cupy or a CUDA build of torch.*DLPack arrays in host or CUDA"):
        adopt_dlpack(on_cuda)
    with pytest.raises(InvalidArgumentError, match=r"device type 10 .*cannot be sent; sparsecoll takes numpy arrays"):
        adopt_dlpack(DLPackOnly(torch.zeros(2), device=(10, 0)))  # ROCm


async def _through_a_group(monkeypatch) -> dict:
    group = await init_group(store=dist.HashStore(), rank=0, world_size=1, timeout=10)
    try:
        outcome = {}
        gradient = torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 1.0])
        total = torch.zeros(6)
        await group.allreduce(DLPackOnly(gradient), out=DLPackOnly(total))
        outcome["allreduce into out"] = total.tolist()
        result, _ = await group.gtopk(DLPackOnly(gradient), k=2)
        outcome["gtopk"] = (result.indices.tolist(), result.values.tolist())
        received = torch.zeros(6)
        await group.broadcast(DLPackOnly(gradient), out=DLPackOnly(received))
        outcome["broadcast into out"] = received.tolist()
        monkeypatch.setattr(device, "cuda_dlpack_importers", lambda: [lambda array: FakeDeviceArray(array.inner.numpy())])
        reset_host_copies()
        summed, _ = await group.allreduce(DLPackOnly(gradient, device=(device.DLPACK_CUDA, 0)))
        outcome["cuda allreduce"] = (summed.tolist(), tuple(host_copies()))
        return outcome
    finally:
        await group.close()


def test_dlpack_only_arrays_through_the_group(monkeypatch) -> None:
    outcome = asyncio.run(asyncio.wait_for(_through_a_group(monkeypatch), 60))
    values = [0.5, -3.0, 0.1, 2.0, -0.2, 1.0]
    assert outcome["allreduce into out"] == pytest.approx(values)
    assert outcome["gtopk"] == ([1, 3], [-3.0, 2.0])
    assert outcome["broadcast into out"] == pytest.approx(values)
    # a CUDA array reaches the dense collective as a device array: staged to the host once, counted
    assert outcome["cuda allreduce"] == (pytest.approx(values), (1, 24, 24))


async def _point_to_point() -> list:
    store = dist.HashStore()
    sender, receiver = await asyncio.gather(*(init_group(store=store, rank=rank, world_size=2, timeout=10)
                                              for rank in range(2)))
    try:
        landed = torch.zeros(3, dtype=torch.float64)
        message, _ = await asyncio.gather(receiver.recv(0, 5, out=DLPackOnly(landed)),
                                          sender.send(DLPackOnly(torch.tensor([1.5, -2.0, 4.0], dtype=torch.float64)), 1, 5))
        return landed.tolist()
    finally:
        await asyncio.gather(sender.close(), receiver.close())


def test_point_to_point_sends_and_receives_into_dlpack_only_arrays() -> None:
    """Two ranks of one process (real TCP on loopback): the message lands in the caller's tensor."""
    assert asyncio.run(asyncio.wait_for(_point_to_point(), 60)) == [1.5, -2.0, 4.0]
