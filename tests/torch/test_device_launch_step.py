"""The device decisions of a step that a CPU machine can still see fail: ``reduce_buffer`` runs
the whole reduction (the fused pass, the collective, the settling) inside ``launching`` of the
caller's capture, with the bucket's host staging current; a CUDA tensor's future names its device.

``launching`` itself needs a CUDA build of torch; here a recorder stands in for it at the one
name ``reduce_buffer`` calls, and sets the kernels' launch stream as the real one does, so the
step's own code reports which stream and staging it ran under. The group is real (one rank, in this process).
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from types import SimpleNamespace

import torch
import torch.distributed as dist

from sparsecoll.group import init_group
from sparsecoll.kernels._dispatch import launch_stream, on_stream
from sparsecoll.torch import exchange
from sparsecoll.torch.device_launch import Launch, capture, future_devices
from sparsecoll.torch.error_feedback import ErrorFeedback
from sparsecoll.transport.staging import current_staging


async def reduce_under_a_recorded_launch(monkeypatch) -> dict:
    entered: list = []

    @contextmanager
    def recording(launch):
        entered.append(launch)
        with on_stream(f"stream of {launch}"):
            yield

    class Observed(ErrorFeedback):
        """Notes the launch stream and whether its own staging is current where the step works."""

        __slots__ = ("seen",)

        def prepare(self, *args, **kwargs):
            self.seen.append(("prepare", launch_stream(), current_staging() is self.staging))
            return super().prepare(*args, **kwargs)

        def settle(self, *args, **kwargs):
            self.seen.append(("settle", launch_stream(), current_staging() is self.staging))
            return super().settle(*args, **kwargs)

    monkeypatch.setattr(exchange, "launching", recording)
    group = await init_group(store=dist.HashStore(), rank=0, world_size=1, timeout=10)
    compression = exchange.Compression("gtopk", 0.1)
    compression.validate()
    outcome = {}
    for name, launch in (("captured", None), ("given", Launch(3, 77))):
        grad = torch.arange(64, dtype=torch.float32) - 20.0
        memory = Observed(grad)
        memory.seen = []
        await exchange.reduce_buffer(group, grad, memory, compression, density=0.1, step=1, seed=0, launch=launch)
        outcome[name] = {"entered": [repr(item) for item in entered], "seen": memory.seen,
                         "sparse": int(torch.count_nonzero(grad))}
        entered.clear()
    await group.close()
    return outcome


def test_reduce_buffer_runs_the_whole_step_inside_the_callers_launch(monkeypatch) -> None:
    outcome = asyncio.run(asyncio.wait_for(reduce_under_a_recorded_launch(monkeypatch), 60))
    # a CPU tensor captures None; the work still runs inside the (recorded) context
    assert outcome["captured"]["entered"] == ["None"]
    assert outcome["captured"]["seen"] == [("prepare", "stream of None", True), ("settle", "stream of None", True)]
    given = repr(Launch(3, 77))
    assert outcome["given"]["entered"] == [given]  # the hook's launch, not this thread's capture
    assert outcome["given"]["seen"] == [("prepare", f"stream of {given}", True), ("settle", f"stream of {given}", True)]
    assert outcome["given"]["sparse"] == outcome["captured"]["sparse"] == 6  # the step did reduce: k = 6 of 64


def test_a_cuda_tensors_future_names_its_device_and_capture_its_current_stream(monkeypatch) -> None:
    on_gpu = SimpleNamespace(device=torch.device("cuda", 1))
    assert future_devices(on_gpu) == [torch.device("cuda", 1)]
    assert future_devices(torch.zeros(2)) == []
    streams = {1: 4242, 2: 5151}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: SimpleNamespace(cuda_stream=streams[device]))
    assert capture(on_gpu) == Launch(1, 4242)  # the tensor's own device
    assert capture(SimpleNamespace(device=torch.device("cuda"))) == Launch(2, 5151)  # no index: the current one
    assert capture(torch.zeros(2)) is None
