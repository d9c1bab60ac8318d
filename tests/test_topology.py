"""Host tables from the ranks' records: grouping, torchrun's local ranks, shard owners, and the
errors every rank raises alike when the records contradict each other (no ranks spawned here;
tests/collectives/test_hierarchical.py discovers topologies on real ranks)."""

from __future__ import annotations

import numpy as np
import pytest

from sparsecoll.errors import CollectiveMismatchError, InvalidArgumentError
from sparsecoll.topology import HOST_ID_ENV, HostTable, host_identity, host_record


def records(*rows: tuple[int, int, int]) -> np.ndarray:
    return np.array(rows, np.int64)


def test_hosts_numbered_by_lowest_rank_and_ranks_in_local_order() -> None:
    table = HostTable.from_records(records((7, -1, -1), (9, -1, -1), (7, -1, -1), (5, -1, -1), (9, -1, -1)))
    assert table.hosts == ((0, 2), (1, 4), (3,))
    assert table.host_keys == (7, 9, 5)
    assert table.shard_count == 2 and not table.uniform and table.hierarchical_helps()


def test_local_rank_orders_a_host() -> None:
    table = HostTable.from_records(records((1, 1, 2), (1, 0, 2), (2, 0, 2), (2, 1, 2)))
    assert table.hosts == ((1, 0), (2, 3))


@pytest.mark.parametrize("rows, complaint", [
    (((1, 0, 3), (1, 1, 3)), "LOCAL_WORLD_SIZE"),
    (((1, 0, 2), (1, 0, 2)), "LOCAL_RANK"),
])
def test_contradicting_records_raise(rows, complaint: str) -> None:
    with pytest.raises(CollectiveMismatchError, match=complaint):
        HostTable.from_records(records(*rows))


@pytest.mark.parametrize("layout, owners", [
    ((3, 1), {0: [0, 3], 1: [1, 3], 2: [2, 3]}),
    ((2, 1, 1), {0: [0, 2, 3], 1: [1, 2, 3]}),
    ((2, 2), {0: [0, 2], 1: [1, 3]}),
])
def test_shard_owners_of_uneven_layouts(layout: tuple[int, ...], owners: dict) -> None:
    rows = [(host, -1, -1) for host, count in enumerate(layout) for _ in range(count)]
    table = HostTable.from_records(records(*rows))
    assert {shard: [table.owner(host, shard) for host in range(len(layout))]
            for shard in range(table.shard_count)} == owners
    for rank in range(len(rows)):
        assert table.shards_of(rank) == tuple(shard for shard, ranks in owners.items() if rank in ranks)


@pytest.mark.parametrize("layout, helps", [((4,), False), ((1, 1, 1), False), ((2, 1), True)])
def test_auto_needs_several_hosts_and_a_shared_one(layout: tuple[int, ...], helps: bool) -> None:
    rows = [(host, -1, -1) for host, count in enumerate(layout) for _ in range(count)]
    assert HostTable.from_records(records(*rows)).hierarchical_helps() is helps


def test_identity_precedence(monkeypatch) -> None:
    for name in (HOST_ID_ENV, "GROUP_RANK", "LOCAL_WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    machine = host_identity()
    assert machine.startswith("host:")
    monkeypatch.setenv("GROUP_RANK", "3")
    assert host_identity() == machine  # a node rank alone is not torchrun's layout
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert host_identity() == "torchrun-node:3"
    assert host_record()[1:].tolist() == [1, 2]
    monkeypatch.setenv(HOST_ID_ENV, "rack4-node2")
    assert host_identity() == "id:rack4-node2"
    other = host_record()[0]
    monkeypatch.setenv(HOST_ID_ENV, "rack4-node3")
    assert host_record()[0] != other


@pytest.mark.parametrize("name, value", [(HOST_ID_ENV, " "), ("LOCAL_RANK", "x")])
def test_bad_environment_is_refused(monkeypatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidArgumentError, match=name):
        host_record()
