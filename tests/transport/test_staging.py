"""A bucket's k pairs to the host: pinned buffers kept between steps, a side stream that waits on
an event recorded after the selection, and a wait on the copies' event only.

No GPU here: a recording runtime (``stream``, ``event``, ``pinned_array`` as ``numba.cuda`` has
them) logs every call in order, so what is checked is which stream each operation names and what
the host waits on. ``staging_cases.py`` runs the real ``numba.cuda`` calls under the simulator
(values, buffer reuse, through the collectives' selection).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sparsecoll.transport.device import host_copies, reset_host_copies
from sparsecoll.transport.staging import HostStaging, current_staging, using_staging

ROOT = Path(__file__).resolve().parents[2]


class Recorder:
    """A CUDA runtime that logs what is asked of it: ``(operation, object, stream)`` tuples."""

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def stream(self) -> Any:
        return Named("side", self.log)

    def event(self) -> Any:
        return Named(f"event{sum(entry[0] == 'event' for entry in self.log)}", self.log, kind="event")

    def pinned_array(self, size: int, dtype: Any) -> np.ndarray:
        self.log.append(("pinned_array", size, None))
        return np.zeros(size, dtype)


class Named:
    """A stream or event of :class:`Recorder` (its name, and every call on it, logged)."""

    def __init__(self, name: str, log: list, kind: str = "stream") -> None:
        self.name, self.log = name, log
        log.append((kind, name, None))

    def record(self, stream: Any) -> None:
        self.log.append(("record", self.name, _name(stream)))

    def wait(self, stream: Any) -> None:
        self.log.append(("wait", self.name, _name(stream)))

    def synchronize(self) -> None:
        self.log.append(("synchronize", self.name, None))

    def __repr__(self) -> str:
        return self.name


class DeviceVector:
    """A flat device array as the staging sees one: size, dtype, ``copy_to_host(out, stream=)``."""

    def __init__(self, name: str, host: np.ndarray, log: list) -> None:
        self.name, self._host, self.log = name, host, log
        self.size, self.dtype = host.size, host.dtype

    def copy_to_host(self, out: np.ndarray, stream: Any = 0) -> np.ndarray:
        assert out.shape == self._host.shape and out.dtype == self._host.dtype
        np.copyto(out, self._host)
        self.log.append(("copy", self.name, _name(stream)))
        return out


def _name(stream: Any) -> str:
    return stream.name if isinstance(stream, Named) else repr(stream)


def test_pairs_copy_on_a_side_stream_after_the_selection_and_wait_on_that_copy_only() -> None:
    runtime = Recorder()
    caller = Named("caller", runtime.log)  # torch's current stream, where the selection ran
    staging = HostStaging(runtime)
    k = 12
    indices = DeviceVector("indices", np.arange(k, dtype=np.int64) * 7, runtime.log)
    values = DeviceVector("values", np.linspace(-1, 1, k).astype(np.float32), runtime.log)
    reset_host_copies()
    runtime.log.clear()
    host_indices, host_values = staging.to_host("selected", caller, indices, values)
    assert host_indices.tolist() == (np.arange(k) * 7).tolist()
    assert host_values.tolist() == np.linspace(-1, 1, k).astype(np.float32).tolist()
    assert tuple(host_copies()) == (2, k * 12, k * 8)
    operations = [entry for entry in runtime.log if entry[0] not in ("stream", "event", "pinned_array")]
    assert operations == [("record", "event0", "caller"),  # after the selection kernels on the caller's stream
                          ("wait", "event0", "side"),  # the side stream waits for them, the host does not
                          ("copy", "indices", "side"), ("copy", "values", "side"),
                          ("record", "event1", "side"),
                          ("synchronize", "event1", None)]  # the host waits for these copies only
    assert [entry[0] for entry in runtime.log].count("pinned_array") == 1 and staging.allocations == 1

    runtime.log.clear()
    again = staging.to_host("selected", caller, indices, values)
    assert [entry for entry in runtime.log if entry[0] in ("stream", "event", "pinned_array")] == []  # nothing new
    assert np.shares_memory(again[0], host_indices)  # the same pinned memory, step after step

    runtime.log.clear()
    more = DeviceVector("indices", np.arange(4 * k, dtype=np.int64), runtime.log)
    staging.to_host("selected", caller, more, DeviceVector("values", np.ones(4 * k, np.float32), runtime.log))
    grown = [entry for entry in runtime.log if entry[0] == "pinned_array"]
    assert staging.allocations == 2 and len(grown) == 1 and grown[0][1] >= 4 * k * 12


def test_labels_keep_apart_and_the_context_names_the_staging() -> None:
    runtime = Recorder()
    staging = HostStaging(runtime)
    log = runtime.log
    selected, = staging.to_host("selected", 0, DeviceVector("a", np.arange(5, dtype=np.int64), log))
    gathered, = staging.to_host("gathered", 0, DeviceVector("b", np.arange(5, dtype=np.int64) + 9, log))
    assert selected.tolist() == list(range(5)) and not np.shares_memory(selected, gathered)
    assert current_staging() is None
    with using_staging(staging):
        assert current_staging() is staging
    assert current_staging() is None


def run_cases(simulate: bool) -> None:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1" if simulate else "0")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).with_name("staging_cases.py"))]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0 and " passed" in proc.stdout and "skipped" not in proc.stdout, report


def test_the_collectives_selection_goes_through_the_staging_under_the_simulator() -> None:
    run_cases(simulate=True)


@pytest.mark.gpu
def test_the_collectives_selection_goes_through_the_staging_on_a_device() -> None:
    """Real pinned memory, a real side stream and events (run by tools/gpu_check.sh)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") != "0":
        pytest.skip("this process runs the CUDA simulator")
    from numba import cuda

    if not cuda.is_available():
        pytest.skip("no CUDA device")
    run_cases(simulate=False)
