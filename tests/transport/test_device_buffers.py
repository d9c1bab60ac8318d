"""Device buffers through the transports, with a fake device array (no GPU here).

``FakeDeviceArray`` has what sparsecoll may use of a device array: ``__cuda_array_interface__``
and Numba's ``copy_to_host``/``copy_to_device``, slicing and reshape, over host memory. It has
no buffer protocol and no ``__array__``: code that handed it to ``memoryview`` or numpy (host
staging by mistake, sizes from the wrong place) fails. What it checks is the interface, not
the speed: UCX gets the array itself, TCP a host copy, sizes and dtypes from the interface, a
strided array a clear refusal, and point-to-point a device ``out``.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest

from sparsecoll.call import _nbytes
from sparsecoll.errors import InvalidArgumentError
from sparsecoll.transport.device import copy_from_host, device_dtype, device_nbytes, stage_to_host
from sparsecoll.wire import HEADER_SIZE
from tests.ranks import run_ranks


class FakeDeviceArray:
    """A device array as sparsecoll sees one, over host memory (see the module docstring)."""

    def __init__(self, host: np.ndarray, readonly: bool = False) -> None:
        self._host = host
        self._readonly = readonly

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self._host.shape, "typestr": self._host.dtype.str, "version": 3,
                "data": (self._host.ctypes.data, self._readonly),
                "strides": None if self._host.flags.c_contiguous else self._host.strides}

    def copy_to_host(self, out: np.ndarray) -> np.ndarray:
        assert out.shape == self._host.shape and out.dtype == self._host.dtype
        np.copyto(out, self._host)
        return out

    def copy_to_device(self, host: np.ndarray) -> None:
        assert host.shape == self._host.shape and host.dtype == self._host.dtype
        np.copyto(self._host, host)

    def reshape(self, *shape: int) -> FakeDeviceArray:
        return FakeDeviceArray(self._host.reshape(*shape), self._readonly)

    def __getitem__(self, index: Any) -> FakeDeviceArray:
        return FakeDeviceArray(self._host[index], self._readonly)

    def view(self, dtype: Any) -> FakeDeviceArray:
        return FakeDeviceArray(self._host.view(dtype), self._readonly)

    def __len__(self) -> int:
        return len(self._host)

    def peek(self) -> np.ndarray:
        """The contents, for the test's assertions (a real one would copy to host)."""
        return self._host.copy()


def test_sizes_and_dtypes_come_from_the_interface_and_strides_are_refused() -> None:
    from sparsecoll.transport.ucx_runtime import as_message, nbytes

    grid = FakeDeviceArray(np.arange(12, dtype=np.float32).reshape(3, 4))
    with pytest.raises(TypeError):
        memoryview(grid)  # the fake is honest: no host buffer behind the interface's back
    assert device_nbytes(grid) == _nbytes(grid) == nbytes(grid) == 48 and device_dtype(grid) == np.float32
    assert as_message(grid) is grid  # UCX gets the array itself
    column = FakeDeviceArray(np.zeros((4, 1), np.int64)[:, :1])
    assert device_nbytes(column) == 32  # a stride along an extent of 1 does not matter
    strided = FakeDeviceArray(np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2])
    for measure in (device_nbytes, _nbytes, nbytes, as_message, stage_to_host):
        with pytest.raises(InvalidArgumentError, match=r"strides \(16, 8\) is not C-contiguous"):
            measure(strided)

    class Masked(FakeDeviceArray):
        @property
        def __cuda_array_interface__(self) -> dict[str, Any]:
            return dict(super().__cuda_array_interface__, mask=object())

    with pytest.raises(InvalidArgumentError, match="masked"):
        device_nbytes(Masked(np.zeros(3)))
    staged = stage_to_host(grid)
    assert isinstance(staged, np.ndarray) and staged.tolist() == list(range(12))
    target = FakeDeviceArray(np.zeros((3, 4), np.float32))
    copy_from_host(staged * 2, target)
    assert target.peek().reshape(-1).tolist() == [2.0 * value for value in range(12)]
    with pytest.raises(InvalidArgumentError, match="read-only"):
        copy_from_host(staged, FakeDeviceArray(np.zeros((3, 4), np.float32), readonly=True))


def test_ucx_frames_hand_device_buffers_over_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ucxx")
    from sparsecoll.transport import ucx_connection
    from sparsecoll.wire import FrameHeader, Kind

    small, large = FakeDeviceArray(np.ones(4, np.float32)), FakeDeviceArray(np.ones(5000, np.float64))
    header = FrameHeader(Kind.DATA, 0, 1, 0, 16 + 40_000)
    # UCX's context says whether a CUDA transport is on; starting one here would bind it to no loop
    monkeypatch.setattr(ucx_connection, "cuda_support", lambda: False)  # UCX_TLS=tcp
    with pytest.raises(InvalidArgumentError, match="no CUDA transport"):
        ucx_connection.frame_messages(header, [small, large], 0)
    monkeypatch.setattr(ucx_connection, "cuda_support", lambda: True)  # UCX_TLS=...,cuda_copy,cuda_ipc
    messages, separate = ucx_connection.frame_messages(header, [small, large], 0, payload_endpoint=True)
    assert messages[1] is small and messages[2] is large and not separate  # no host copy, no shared memory
    (count,) = struct.unpack_from("<I", messages[0], HEADER_SIZE)  # the segment table: sizes from the interface
    assert (count, *struct.unpack_from("<2Q", messages[0], HEADER_SIZE + 4)) == (2, 16, 40_000)
    single = ucx_connection.frame_messages(FrameHeader(Kind.DATA, 0, 1, 0, 16), [small], 0)[0]
    assert single[1] is small  # even a payload small enough to inline stays on the device


async def device_point_to_point(group) -> dict[str, Any]:
    from sparsecoll.errors import InvalidArgumentError as Refused

    outcome: dict[str, Any] = {}
    if group.rank == 0:
        await group.send(FakeDeviceArray(np.arange(1000, dtype=np.float32)), 1, tag=1)
        await group.send(FakeDeviceArray(np.arange(12, dtype=np.int64).reshape(3, 4)), 1, tag=2)
        await group.send(FakeDeviceArray(np.full(3, 7, np.float64)), 1, tag=3)
        await group.send(np.arange(5, dtype=np.float32), 1, tag=4)
        try:
            await group.send(FakeDeviceArray(np.zeros((4, 4), np.float32)[:, ::2]), 1, tag=5)
        except Refused as error:
            outcome["strided"] = str(error)
        await group.send(FakeDeviceArray(np.ones(2, np.int32)), 1, tag=6)  # the group is still usable
    else:
        exact = FakeDeviceArray(np.zeros(1000, np.float32))
        message = await group.recv(0, tag=1, out=exact)
        outcome["exact"] = message.value is exact and exact.peek().tolist() == list(range(1000))
        larger = FakeDeviceArray(np.full(20, -1, np.int64))
        message = await group.recv(0, tag=2, out=larger)
        outcome["prefix"] = (device_nbytes(message.value), larger.peek().tolist())
        message = await group.recv(0, tag=3)
        outcome["host"] = (type(message.value).__name__, message.value.tolist())
        device_out = FakeDeviceArray(np.zeros(5, np.float32))
        await group.recv(0, tag=4, out=device_out)  # a host array sent, received on the device
        outcome["host_to_device"] = device_out.peek().tolist()
        try:
            await group.recv(0, tag=6, out=FakeDeviceArray(np.zeros(2, np.int32), readonly=True))
        except Refused as error:
            outcome["readonly"] = str(error)
        outcome["after"] = (await group.recv(0, tag=6)).value.tolist()
    return outcome


def test_device_arrays_through_tcp_point_to_point() -> None:
    sender, receiver = run_ranks(2, device_point_to_point, timeout=90)
    assert "not C-contiguous" in sender["strided"]
    assert receiver["exact"]
    assert receiver["prefix"] == (96, list(range(12)) + [-1] * 8)
    assert receiver["host"] == ("ndarray", [7.0, 7.0, 7.0])
    assert receiver["host_to_device"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert "read-only" in receiver["readonly"] and receiver["after"] == [1, 1]
