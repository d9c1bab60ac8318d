"""The UCX transport reaches into ucxx internals, so it runs only on the ucxx minor versions tested
(pyproject's ``ucx`` extra): any other installed version fails here, loudly, before it fails in use."""

from __future__ import annotations

import importlib.metadata
import pathlib
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml"
PRIVATE_SURFACES = ("Endpoint._ep", "Endpoint._tags", "ucxx.core._get_ctx", "ProgressTasks", "_lib.arr.Array")


def ucxx_pin() -> Requirement:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["ucx"]
    (requirement,) = (Requirement(line) for line in extras if line.startswith("ucxx"))
    return requirement


def installed_ucxx() -> tuple[str, Version] | None:
    for distribution in ("ucxx-cu12", "ucxx-cu13", "ucxx"):
        try:
            return distribution, Version(importlib.metadata.version(distribution))
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def test_the_pin_is_one_tested_minor_range() -> None:
    pin = ucxx_pin()
    bounds = {spec.operator: Version(spec.version) for spec in pin.specifier}
    assert set(bounds) == {">=", "<"}, f"{pin}: pin ucxx to the tested minor versions (>=X.Y,<X.Z)"
    assert bounds["<"].major == bounds[">="].major and bounds["<"].micro == 0


def test_installed_ucxx_is_a_tested_version() -> None:
    found = installed_ucxx()
    if found is None:
        pytest.skip("ucxx is not installed (the UCX transport is optional)")
    distribution, version = found
    pin = ucxx_pin()
    assert pin.specifier.contains(version), (
        f"{distribution} {version} is not a tested version ({pin.specifier}): sparsecoll's UCX transport "
        f"uses ucxx internals ({', '.join(PRIVATE_SURFACES)}) that may change between minor versions; "
        "run tests/transport with SPARSECOLL_BACKEND=ucx on it, then widen the pin in pyproject.toml")
