"""How the UCX runtime reads UCX_TLS and SPARSECOLL_UCX_SHARED_MEMORY (no ucxx needed)."""

from __future__ import annotations

import pytest

from sparsecoll.errors import InvalidArgumentError
from sparsecoll.transport import ucx_runtime


@pytest.mark.parametrize("setting, expected", [
    ("all", "^cma,knem,xpmem"),
    ("sm,tcp", "posix,sysv,tcp"),
    ("SHM, tcp", "posix,sysv,tcp"),
    ("rc,cuda_copy,cuda_ipc,sm,self", "rc,cuda_copy,cuda_ipc,posix,sysv,self"),
    ("posix,cma,tcp", "posix,tcp"),
    ("mm,sysv", "posix,sysv"),
    ("tcp", "tcp"),
    ("^ib", "^ib,cma,knem,xpmem"),
    ("^cma", "^cma,knem,xpmem"),
])
def test_peer_memory_transports_are_left_out_and_aliases_expanded(setting: str, expected: str) -> None:
    assert ucx_runtime.without_peer_memory(setting) == expected


@pytest.mark.parametrize("setting, allowed", [
    ("all", True), ("sm,tcp", True), ("sysv", True), ("^cma", True), ("^ib,posix", True),
    ("tcp", False), ("cma,tcp", False), ("rc,cuda_copy", False), ("^sm", False), ("^posix,sysv", False),
    ("^mm", False), ("^all", False),
])
def test_shared_memory_is_allowed_only_through_posix_or_sysv(setting: str, allowed: bool) -> None:
    assert ucx_runtime.shared_memory_allowed(setting) is allowed
    if allowed:
        assert ucx_runtime.shared_memory_allowed(ucx_runtime.without_peer_memory(setting))


@pytest.mark.parametrize("value, asked", [(None, True), ("1", True), (" 0 ", False), ("", True)])
def test_shared_memory_is_on_unless_turned_off(monkeypatch: pytest.MonkeyPatch, value: str | None,
                                               asked: bool) -> None:
    if value is None:
        monkeypatch.delenv("SPARSECOLL_UCX_SHARED_MEMORY", raising=False)
    else:
        monkeypatch.setenv("SPARSECOLL_UCX_SHARED_MEMORY", value)
    assert ucx_runtime.shared_memory_asked() is asked


def test_an_unknown_shared_memory_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSECOLL_UCX_SHARED_MEMORY", "yes")
    with pytest.raises(InvalidArgumentError, match="yes"):
        ucx_runtime.shared_memory_asked()
