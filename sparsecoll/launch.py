"""Run N local ranks as real processes, the way ``torch.multiprocessing.spawn`` does.

The parent hosts a torch ``TCPStore`` on port 0 (playing the torchrun agent) and starts each
rank in a fresh ``spawn`` process with the variables torchrun sets. A rank's return value, or
the sparsecoll error it raised, comes back through a queue; a rank that does not finish
within the deadline is killed, so a hang becomes an error instead of blocking the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import sparsecoll
from sparsecoll.errors import SparseCollError

_CONTEXT = multiprocessing.get_context("spawn")


class RankCrashed(RuntimeError):
    """A rank died, hung, or raised something that is not a sparsecoll error."""


def _rank_main(rank: int, world_size: int, env: dict[str, str], target: Callable, args: tuple,
               group_kwargs: dict | None, results: Any) -> None:
    os.environ.update(env)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)

    async def with_group() -> Any:
        async with await sparsecoll.init_group(**group_kwargs) as group:
            return await target(group, *args)

    try:
        if group_kwargs is not None:
            results.put((rank, "ok", asyncio.run(with_group())))
        elif asyncio.iscoroutinefunction(target):
            results.put((rank, "ok", asyncio.run(target(rank, world_size, *args))))
        else:
            results.put((rank, "ok", target(rank, world_size, *args)))
    except SparseCollError as error:
        results.put((rank, "error", error))
    except BaseException as error:
        results.put((rank, "crash", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``variables`` set, restored afterwards.

    A spawned rank inherits the parent's environment when it starts, and it imports modules
    (unpickling ``target`` imports its module, numba among them) before ``_rank_main`` runs;
    settings read at import, such as ``NUMBA_NUM_THREADS``, must be there from the start.
    """
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def spawn(world_size: int, target: Callable, *args: Any, timeout: float = 600.0,
          group_kwargs: dict | None = None, env: dict[str, str] | None = None,
          per_rank_env: dict[int, dict[str, str]] | None = None, expect_dead: Iterable[int] = (),
          on_started: Callable | None = None) -> list[Any]:
    """Run ``target`` on ``world_size`` local ranks and return what each rank returned.

    With ``group_kwargs`` (a dict, possibly empty) each rank runs
    ``await target(group, *args)`` inside ``init_group(**group_kwargs)``; with None it runs
    ``target(rank, world_size, *args)`` (awaited when it is a coroutine function). A
    sparsecoll error is returned in its rank's slot; any other failure raises RankCrashed.
    ``target`` must be importable by name (module level) since ranks are spawned.
    """
    from torch.distributed import TCPStore  # the same store torchrun's agent hosts

    store = TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    base_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                "TORCHELASTIC_USE_AGENT_STORE": "True"}
    if "SPARSECOLL_SECRET" not in os.environ:
        base_env["SPARSECOLL_SECRET"] = os.urandom(16).hex()
    base_env.update(env or {})
    expect_dead = set(expect_dead)
    results = _CONTEXT.Queue()
    processes = []
    for rank in range(world_size):
        rank_env = dict(base_env, **(per_rank_env or {}).get(rank, {}))
        process = _CONTEXT.Process(target=_rank_main, daemon=True, args=(
            rank, world_size, rank_env, target, args, group_kwargs, results))
        with _environment(rank_env):  # the child starts with it: read before it imports anything
            process.start()
        processes.append(process)
    if on_started is not None:
        on_started(processes, store)
    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    collected = False
    try:
        while len(outcomes) < world_size - len(expect_dead):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outcomes))
                raise RankCrashed(f"ranks {missing} did not finish within {timeout} s")
            try:
                rank, status, value = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                _check_for_dead(processes, outcomes, expect_dead, results)
                continue
            outcomes[rank] = (status, value)
        collected = True
    finally:  # interrupted (Ctrl-C, SIGTERM) or past the deadline: the ranks get 2 s, not what is left of it
        for process in processes:
            process.join(timeout=2 if expect_dead or not collected else max(0.1, deadline - time.monotonic()))
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


def _check_for_dead(processes: list, outcomes: dict, expect_dead: set[int], results: Any) -> None:
    dead = [rank for rank, process in enumerate(processes)
            if not process.is_alive() and rank not in outcomes and rank not in expect_dead]
    if dead:
        time.sleep(0.2)  # a rank's last result may still be in the queue's pipe
        if results.empty():
            codes = [processes[rank].exitcode for rank in dead]
            raise RankCrashed(f"ranks {dead} died without a result (exit codes {codes})")
