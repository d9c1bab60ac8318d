"""The CUDA kernels launch and copy on the stream ``on_stream`` names (torch's current stream, in
the torch layer), and on Numba's default stream (0) outside it.

Not collected by a plain ``pytest``: ``test_cuda.py`` runs this file in a subprocess under
Numba's CUDA simulator (and on a GPU where one is present). The launches are observed at
Numba's kernel configuration (``kernel[blocks, threads, stream]``), so what is checked is which
stream each launch names, on the simulator as on a device.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

from sparsecoll import kernels
from sparsecoll.kernels import _fused_cuda, fused
from sparsecoll.kernels._dispatch import launch_stream, on_stream

if not cuda.is_available():
    pytest.skip("neither a CUDA device nor the simulator is available", allow_module_level=True)

SIZE, K = 1024, 12


def _step_kernels() -> None:
    """What a device step launches: the fused pass, an exact and a sampled top-k, a gather."""
    rng = np.random.default_rng(3)
    grad, residual = (cuda.to_device(rng.standard_normal(SIZE).astype(np.float32)) for _ in range(2))
    fused.accumulate_select(grad, residual, None)
    kernels.topk(residual, K, method="exact")
    kernels.topk(residual, K, method="fast", seed=1)
    kernels.gather(residual, cuda.to_device(np.arange(K, dtype=np.int64)))


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list:
    """The stream every kernel launch names (0 when it names none)."""
    seen: list = []
    kernel_type = type(_fused_cuda._accumulate_kernel)
    configure = kernel_type.__getitem__

    def recording(kernel, configuration):
        seen.append(configuration[2] if len(configuration) > 2 else 0)
        return configure(kernel, configuration)

    monkeypatch.setattr(kernel_type, "__getitem__", recording)
    return seen


def test_kernels_run_on_the_stream_they_are_given(launches: list) -> None:
    stream = cuda.stream()
    with on_stream(stream):
        assert launch_stream() is stream
        _step_kernels()
    on_torch_stream = list(launches)
    assert len(on_torch_stream) >= 4 and all(named is stream for named in on_torch_stream), on_torch_stream
    launches.clear()
    assert launch_stream() == 0
    _step_kernels()
    assert launches and all(named == 0 for named in launches), launches
