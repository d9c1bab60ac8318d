"""Which ranks of a group share a host, and the sub-groups the two-level collectives run on.

A rank names its host by, in this order:

1. ``SPARSECOLL_HOST_ID`` (any string): set it to emulate hosts on one machine (the bench's
   ``--ranks-per-host``, the tests) or to group ranks by hand;
2. torchrun's ``GROUP_RANK`` (its node rank), when ``LOCAL_WORLD_SIZE`` is set too;
3. the hostname and the kernel's boot id (``/proc/sys/kernel/random/boot_id``), which tells
   apart containers that share a hostname on different machines.

:meth:`Topology.discover` allgathers one fixed-size record per rank (a 64-bit hash of that
name, torchrun's ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` or -1), so every rank builds the same
table from the same bytes; where torchrun's numbers contradict the table (a host holding
another count of ranks than ``LOCAL_WORLD_SIZE`` says), every rank raises the same
CollectiveMismatchError. Hosts are numbered in the order of their lowest rank; inside a host,
ranks are ordered by ``LOCAL_RANK`` (else by rank).

The two-level collectives cut the gradient into S = (largest host's rank count) shards.
Local rank ``j mod L_h`` of host h owns shard j, and the owners of shard j on every host form
inter-host group j (with L ranks on every host: local rank j of every host). Once the table is
agreed, every rank builds the same sub-groups from it with :meth:`Group.new_group` (no further
message: a :meth:`Group.split` would be one more collective over the whole group, issued after
a wait, where it could fall between other calls of that group in a different order on different
ranks). A host gets two groups over the same ranks, one for the reduce-scatter and one for the
allgather of the two-level algorithms, so that concurrent two-level calls (the optimizer's
buckets) can run step 1 of one call beside step 3 of another; :class:`CallOrder` starts each
step of concurrent calls in the order the calls began, the same on every rank.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sparsecoll.errors import CollectiveMismatchError, InvalidArgumentError

if TYPE_CHECKING:
    from sparsecoll.group import Group

HOST_ID_ENV = "SPARSECOLL_HOST_ID"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def host_identity() -> str:
    """This process's host name, by the rules in the module docstring."""
    configured = os.environ.get(HOST_ID_ENV)
    if configured is not None:
        if not configured.strip():
            raise InvalidArgumentError(f"{HOST_ID_ENV} is set but empty")
        return f"id:{configured}"
    if "GROUP_RANK" in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
        return f"torchrun-node:{os.environ['GROUP_RANK']}"
    try:
        with open(BOOT_ID_PATH) as handle:
            boot_id = handle.read().strip()
    except OSError:
        boot_id = ""
    return f"host:{socket.gethostname()}:{boot_id}"


def _env_int(name: str) -> int:
    text = os.environ.get(name, "")
    if not text:
        return -1
    if not text.isdigit():
        raise InvalidArgumentError(f"{name}={text!r} is not a non-negative integer")
    return int(text)


def host_record() -> np.ndarray:
    """This rank's record for the exchange: host-name hash, LOCAL_RANK, LOCAL_WORLD_SIZE."""
    digest = int.from_bytes(hashlib.sha256(host_identity().encode()).digest()[:8], "little", signed=True)
    return np.array([digest, _env_int("LOCAL_RANK"), _env_int("LOCAL_WORLD_SIZE")], np.int64)


@dataclass(frozen=True)
class HostTable:
    """The agreed layout: for each host (numbered by lowest rank), its ranks in local order."""

    hosts: tuple[tuple[int, ...], ...]
    host_keys: tuple[int, ...]
    """The 64-bit host-name hash of each host (the same in every group of the job)."""

    @classmethod
    def from_records(cls, records: np.ndarray, rank: int = -1) -> HostTable:
        """Build the table from every rank's :func:`host_record` (rows in rank order); every
        rank gets the same table or the same CollectiveMismatchError from the same rows."""
        keys: list[int] = []
        members: dict[int, list[int]] = {}
        for member, (key, _, _) in enumerate(records.tolist()):
            if key not in members:
                keys.append(key)
                members[key] = []
            members[key].append(member)
        hosts = []
        for key in keys:
            ranks = members[key]
            local_ranks = [int(records[member, 1]) for member in ranks]
            sizes = {int(records[member, 2]) for member in ranks}
            if sizes != {-1} and sizes != {len(ranks)}:
                raise CollectiveMismatchError(
                    f"ranks {ranks} share a host but LOCAL_WORLD_SIZE says {sorted(sizes)}", rank=rank)
            if -1 not in local_ranks:
                if sorted(local_ranks) != list(range(len(ranks))):
                    raise CollectiveMismatchError(
                        f"ranks {ranks} share a host but their LOCAL_RANKs are {local_ranks}", rank=rank)
                ranks = [member for _, member in sorted(zip(local_ranks, ranks))]
            hosts.append(tuple(ranks))
        return cls(tuple(hosts), tuple(keys))

    @property
    def host_count(self) -> int:
        return len(self.hosts)

    @property
    def shard_count(self) -> int:
        """S: the largest host's rank count (the number of shards of the two-level algorithms)."""
        return max(len(ranks) for ranks in self.hosts)

    def host_of(self, rank: int) -> int:
        """Index of the host of group rank ``rank``."""
        return next(index for index, ranks in enumerate(self.hosts) if rank in ranks)

    def owner(self, host: int, shard: int) -> int:
        """Group rank that owns ``shard`` on ``host``: its local rank ``shard mod L_host``."""
        ranks = self.hosts[host]
        return ranks[shard % len(ranks)]

    def shards_of(self, rank: int) -> tuple[int, ...]:
        """The shards group rank ``rank`` owns on its host, ascending."""
        host = self.host_of(rank)
        return tuple(shard for shard in range(self.shard_count) if self.owner(host, shard) == rank)

    @property
    def uniform(self) -> bool:
        """Whether every host holds the same number of ranks."""
        return len({len(ranks) for ranks in self.hosts}) == 1

    def hierarchical_helps(self) -> bool:
        """More than one host and some host with more than one rank: what "auto" asks."""
        return self.host_count > 1 and self.shard_count > 1


@dataclass(frozen=True)
class HostGroups:
    """This rank's sub-groups for the two-level algorithms."""

    scatter: Group
    """This rank's host, for the reduce-scatter (step 1)."""
    gather: Group
    """This rank's host again, for the allgather (step 3): its own sequence numbers."""
    inter: dict[int, Group]
    """For each shard this rank owns, the owners of that shard on every host, by host index."""


class CallOrder:
    """Starts each step of concurrent two-level calls in the order the calls began.

    A call takes a ticket when it begins (before its first wait, so tickets follow the order in
    which the ranks make their calls); before starting step s on its sub-groups it waits until
    every earlier ticket has started step s (or given up), so the sub-groups' calls get the same
    sequence numbers on every rank, whatever the network's timing.
    """

    STEPS = 3

    def __init__(self) -> None:
        self._issued = 0
        self._next = [0] * self.STEPS
        self._passed: list[set[int]] = [set() for _ in range(self.STEPS)]
        self._changed = asyncio.Event()

    def ticket(self) -> int:
        """The next call's place in line."""
        self._issued += 1
        return self._issued - 1

    async def start(self, ticket: int, step: int, calls: list[Awaitable]) -> list[asyncio.Task]:
        """Wait for ``ticket``'s turn at ``step``, start ``calls`` (each assigns its sequence
        number in its first slice of the loop), let the next ticket go, and return the tasks."""
        while self._next[step] != ticket:
            await self._changed.wait()
        try:
            tasks = [asyncio.ensure_future(call) for call in calls]
            await asyncio.sleep(0)  # the new tasks run their first slice before this one resumes
        finally:
            self.passed(ticket, step)
        return tasks

    def passed(self, ticket: int, *steps: int) -> None:
        """Mark ``steps`` (default: all) of ``ticket`` as started, or skipped, and wake the line."""
        for step in steps or range(self.STEPS):
            if ticket < self._next[step]:
                continue  # already past this step
            self._passed[step].add(ticket)
            while self._next[step] in self._passed[step]:
                self._passed[step].discard(self._next[step])
                self._next[step] += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


class Topology:
    """A group's hosts and its intra-/inter-host sub-groups (see the module docstring).

    ``group.topology`` is this object, created once per group; :meth:`discover` (a collective
    over the group: every rank calls it, in the same order as its other collectives) fills the
    table and builds the sub-groups. The two-level collectives call it themselves.
    """

    def __init__(self, group: Group) -> None:
        self._group = group
        self._table: HostTable | None = None
        self._groups: HostGroups | None = None
        self._lock = asyncio.Lock()
        self.order = CallOrder()

    @property
    def known(self) -> bool:
        """Whether :meth:`discover` has run."""
        return self._table is not None

    @property
    def table(self) -> HostTable:
        """The agreed host table; InvalidArgumentError before :meth:`discover`."""
        if self._table is None:
            raise InvalidArgumentError("the group's topology is not known yet: await group.topology.discover()",
                                       rank=self._group.rank)
        return self._table

    @property
    def groups(self) -> HostGroups:
        """This rank's intra- and inter-host sub-groups; InvalidArgumentError before :meth:`discover`."""
        if self._groups is None:
            raise InvalidArgumentError("the group's topology is not known yet: await group.topology.discover()",
                                       rank=self._group.rank)
        return self._groups

    @property
    def host(self) -> int:
        """This rank's host index."""
        return self.table.host_of(self._group.rank)

    @property
    def local_rank(self) -> int:
        """This rank's place among its host's ranks."""
        return self.table.hosts[self.host].index(self._group.rank)

    @property
    def local_size(self) -> int:
        """How many ranks of the group share this rank's host."""
        return len(self.table.hosts[self.host])

    async def discover(self, timeout: float | None = None) -> Topology:
        """Exchange host records once (a collective) and build the table and the sub-groups;
        later calls return at once."""
        async with self._lock:
            if self._table is None:
                group = self._group
                records, _ = await group.allgather(host_record(), timeout=timeout)
                table = HostTable.from_records(np.asarray(records), group.rank)
                self._groups = self._build_groups(table)
                self._table = table
                group.learn_hosts({group.members[member]: table.host_keys[index]
                                   for index, ranks in enumerate(table.hosts) for member in ranks})
        return self

    def _build_groups(self, table: HostTable) -> HostGroups:
        """Every rank creates every sub-group in the same order (new_group's rule); it keeps its own."""
        group = self._group
        scatter = gather = None
        for ranks in table.hosts:
            scatter = group.new_group(ranks, name=f"{group.name}/host-scatter") or scatter
        for ranks in table.hosts:
            gather = group.new_group(ranks, name=f"{group.name}/host-gather") or gather
        inter = {}
        for shard in range(table.shard_count):
            owners = [table.owner(host, shard) for host in range(table.host_count)]
            child = group.new_group(owners, name=f"{group.name}/between-hosts-{shard}")
            if child is not None:
                inter[shard] = child
        return HostGroups(scatter, gather, inter)
