"""Spawn real ranks on loopback for multi-process tests, with a hard timeout.

The parent hosts a torch TCPStore on port 0 and starts each rank in a fresh process with
the variables torchrun sets (the store plays the torchrun agent's). A rank's return value or
exception comes back through a queue; a rank that does not finish in time is killed and the
test fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

from torch.distributed import TCPStore

import sparsecoll
from sparsecoll.errors import SparseCollError

_CONTEXT = multiprocessing.get_context("spawn")


class RankCrashed(Exception):
    """A rank died or raised something that is not a sparsecoll error."""


def _rank_main(rank: int, world_size: int, env: dict[str, str], target: Callable,
               args: tuple, group_kwargs: dict, results: Any) -> None:
    os.environ.update(env)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)

    async def main() -> Any:
        if group_kwargs is None:
            return await target(rank, world_size, *args)
        async with await sparsecoll.init_group(**group_kwargs) as group:
            return await target(group, *args)

    try:
        if group_kwargs is None and not asyncio.iscoroutinefunction(target):
            results.put((rank, "ok", target(rank, world_size, *args)))
        else:
            results.put((rank, "ok", asyncio.run(main())))
    except SparseCollError as error:
        results.put((rank, "error", error))
    except BaseException as error:  # report anything else with its traceback
        results.put((rank, "crash", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))


def run_ranks(world_size: int, target: Callable, *args: Any, timeout: float = 60.0,
              group_kwargs: dict | None = {}, env: dict[str, str] | None = None,
              per_rank_env: dict[int, dict[str, str]] | None = None,
              expect_dead: set[int] = frozenset(), on_started: Callable | None = None) -> list[Any]:
    """Run ``await target(group, *args)`` on ``world_size`` ranks; return values or errors by rank.

    ``group_kwargs=None`` calls ``target(rank, world_size, *args)`` without creating a group.
    Ranks in ``expect_dead`` may die without reporting. A sparsecoll error is returned in
    its rank's slot; any other exception fails the test with the rank's traceback.
    """
    store = TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    base_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                "TORCHELASTIC_USE_AGENT_STORE": "True", "SPARSECOLL_SECRET": "test-secret"}
    base_env.update(env or {})
    results = _CONTEXT.Queue()
    processes = []
    for rank in range(world_size):
        rank_env = dict(base_env, **(per_rank_env or {}).get(rank, {}))
        process = _CONTEXT.Process(
            target=_rank_main, daemon=True,
            args=(rank, world_size, rank_env, target, args, group_kwargs, results))
        process.start()
        processes.append(process)
    if on_started is not None:
        on_started(processes, store)
    outcomes: dict[int, tuple] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size - len(expect_dead):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"ranks {sorted(set(range(world_size)) - set(outcomes))} "
                                     f"did not finish within {timeout} s")
            try:
                rank, status, value = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [r for r, p in enumerate(processes)
                        if not p.is_alive() and r not in outcomes and r not in expect_dead]
                if dead and all(processes[r].exitcode not in (0, None) for r in dead):
                    time.sleep(0.2)
                    if results.empty():
                        raise RankCrashed(f"ranks {dead} died with exit codes "
                                          f"{[processes[r].exitcode for r in dead]}") from None
                continue
            outcomes[rank] = (status, value)
    finally:
        for process in processes:
            process.join(timeout=max(0.1, deadline - time.monotonic()) if not expect_dead else 2)
            if process.is_alive():
                process.kill()
                process.join()
    values = []
    for rank in range(world_size):
        status, value = outcomes.get(rank, ("dead", None))
        if status == "crash":
            raise RankCrashed(f"rank {rank} crashed:\n{value}")
        values.append(value)
    return values
