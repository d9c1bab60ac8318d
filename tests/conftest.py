"""Shared fixtures: the ``backend`` every multi-process suite runs against (tcp and ucx)."""

from __future__ import annotations

import functools
import os

import pytest

UCX_TEST_ENV = {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo", "UCX_WARN_UNUSED_ENV_VARS": "n"}
"""UCX over loopback TCP, which any machine has; a variable already set wins (e.g. UCX_TLS=sm)."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ucx: runs ranks over the UCX transport (needs ucxx)")


def ucx_required() -> bool:
    """CI sets SPARSECOLL_REQUIRE_UCX=1: there a UCX import failure fails instead of skipping."""
    return os.environ.get("SPARSECOLL_REQUIRE_UCX") == "1"


@functools.cache
def ucx_unavailable() -> str:
    """Why the UCX backend cannot run here ('' when it can)."""
    try:
        import ucxx  # noqa: F401
    except Exception as error:  # ImportError, or a missing libucx behind it
        return f"ucxx cannot be imported ({type(error).__name__}: {error})"
    return ""


@pytest.fixture(params=["tcp", pytest.param("ucx", marks=pytest.mark.ucx)])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The transport the spawned ranks use (they inherit SPARSECOLL_BACKEND and UCX_*)."""
    if request.param == "ucx":
        reason = ucx_unavailable()
        if reason and ucx_required():
            pytest.fail(f"SPARSECOLL_REQUIRE_UCX=1 but {reason}")
        if reason:
            pytest.skip(reason)
        for key, value in UCX_TEST_ENV.items():
            if key not in os.environ:
                monkeypatch.setenv(key, value)
    monkeypatch.setenv("SPARSECOLL_BACKEND", request.param)
    return request.param
