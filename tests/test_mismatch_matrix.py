"""Every collective × every signature field: a disagreeing rank makes every rank raise a mismatch.

One spawn of 3 ranks runs the whole matrix; since a mismatch poisons a group (and its root), each
scenario gets a fresh group (over one store client: connecting to the store is the slow part). In each scenario the last rank calls the same
collective with one field changed (op or algorithm, dtype, count, k, root/leader, bits); the
disagreeing rank's frames arrive before the others post their receives in half of the
scenarios and after in the other half. Every rank must raise CollectiveMismatchError itself,
not a length error, a timeout or an abort forwarded from a peer (a mismatch must be recognised
as one wherever it is seen).
"""

from __future__ import annotations

import asyncio
import os

import numpy as np

import sparsecoll
from sparsecoll.collectives.lazy import LazyState
from sparsecoll.errors import SparseCollError
from tests.ranks import run_ranks

WORLD = 3
SIZE = 64
BASE = {"dtype": np.float32, "count": SIZE, "k": 4, "root": 0, "bits": 8, "op": "sum"}


def _data(settings: dict) -> np.ndarray:
    return np.random.default_rng(1).standard_normal(settings["count"]).astype(settings["dtype"])


CALLS = {
    "allreduce": (lambda g, s: g.allreduce(_data(s), op=s["op"]), ("op", "dtype", "count")),
    "allgather": (lambda g, s: g.allgather(_data(s)), ("dtype", "count")),
    "broadcast": (lambda g, s: g.broadcast(_data(s), root=s["root"]), ("dtype", "count", "root")),
    "quantized": (lambda g, s: g.reduce_gradient(_data(s), "dense", quantize_bits=s["bits"]),
                  ("dtype", "count", "bits")),
    "lazy": (lambda g, s: g.reduce_gradient(_data(s), "dense", lazy=LazyState(), quantize_bits=s["bits"]),
             ("dtype", "count", "bits")),
    "sparse_allgather": (lambda g, s: g.sparse_allgather(_data(s), k=s["k"], quantize_bits=s["bits"]),
                         ("dtype", "count", "k", "bits")),
    "gtopk": (lambda g, s: g.gtopk(_data(s), k=s["k"], quantize_bits=s["bits"]), ("dtype", "count", "k", "bits")),
    "sketch": (lambda g, s: g.sketch_allreduce(_data(s), k=s["k"], quantize_bits=s["bits"]),
               ("dtype", "count", "k", "bits")),
    "cltk": (lambda g, s: g.cltk(_data(s), k=s["k"], step=s["root"], quantize_bits=s["bits"]),
             ("dtype", "count", "k", "root", "bits")),
}
CHANGED = {"op": "max", "dtype": np.float64, "count": SIZE + 3, "k": 5, "root": 1, "bits": 4}
OTHER_COLLECTIVE = {"allreduce": "allgather", "allgather": "broadcast", "broadcast": "allreduce",
                    "quantized": "allreduce", "lazy": "quantized", "sparse_allgather": "gtopk",
                    "gtopk": "sketch", "sketch": "cltk", "cltk": "sparse_allgather"}


def scenarios() -> list[tuple[str, str]]:
    """(collective, field) pairs; field "collective" means the odd rank calls another one."""
    return [(name, field) for name, (_, fields) in CALLS.items() for field in ("collective", *fields)]


async def run_scenario(rank: int, world: int, store, number: int, name: str, field: str) -> tuple[str, str, str]:
    """One scenario in its own group: the outcome this rank saw."""
    odd = rank == world - 1
    group = await sparsecoll.init_group(rank=rank, world_size=world, store=store, name=f"mismatch-{number}",
                                        timeout=30, kernel_threads=1)
    try:
        settings = dict(BASE)
        collective = name
        if odd and field == "collective":
            collective = OTHER_COLLECTIVE[name]
        elif odd:
            settings[field] = CHANGED[field]
        await group.barrier()
        if odd != (number % 2 == 0):  # the odd rank's frames arrive before, or after, the receives
            await asyncio.sleep(0.2)
        try:
            await CALLS[collective][0](group, settings)
            await group.barrier()
            return name, field, "no error"
        except SparseCollError as error:
            return name, field, type(error).__name__
    finally:
        await group.close(linger=0.2)  # nothing is in flight any more: no need to wait for stragglers


async def run_matrix(rank: int, world: int) -> list[tuple[str, str, str]]:
    """Every scenario, each in a group of its own, over one store client."""
    from torch.distributed import TCPStore  # one client for every group: connecting is the slow part

    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
    # in turn: concurrent rendezvous would block the shared client's threads on each other's waits
    return [await run_scenario(rank, world, store, number, name, field)
            for number, (name, field) in enumerate(scenarios())]


def test_every_collective_and_field_raise_a_mismatch_on_every_rank() -> None:
    results = run_ranks(WORLD, run_matrix, timeout=280, group_kwargs=None)
    assert all(isinstance(result, list) for result in results), results  # a returned error fails here
    wrong = [(rank, name, field, outcome) for rank, outcomes in enumerate(results)
             for name, field, outcome in outcomes if outcome != "CollectiveMismatchError"]
    assert not wrong, wrong
    assert all(len(outcomes) == len(scenarios()) for outcomes in results)
