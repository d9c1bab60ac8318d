"""Multi-process test helper: real ranks on loopback with a hard timeout (see sparsecoll.launch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sparsecoll.launch import RankCrashed, spawn

__all__ = ["RankCrashed", "run_ranks"]

_WITH_GROUP: dict = {}


def run_ranks(world_size: int, target: Callable, *args: Any, timeout: float = 60.0,
              group_kwargs: dict | None = _WITH_GROUP, **options: Any) -> list[Any]:
    """``spawn`` with a test-sized timeout, a test secret, and a default group per rank.

    Pass ``group_kwargs=None`` to run ``target(rank, world_size, *args)`` without a group.
    """
    env = {"SPARSECOLL_SECRET": "test-secret", **options.pop("env", {})}
    return spawn(world_size, target, *args, timeout=timeout, group_kwargs=group_kwargs,
                 env=env, **options)
