"""Two-level reduction against a numpy model of the same two levels, on real ranks.

One spawn of 6 ranks whose SPARSECOLL_HOST_ID puts ranks 0-2 on host a, 3-4 on b and 5 on c.
Sub-groups of it give every layout the checks need (a group's topology is its own members'
hosts): 2+2, 3+1, 2+1+1, 3+2+1 (all 6), one host (0-2) and one rank a host (0, 3, 5). For
each layout and algorithm, every rank checks:

- the result equals the numpy model: host sums in local-rank order (of the ranks' own top-k
  for gTop-k and allgather, of whole shards for dense and CLT-k), the algorithm between the
  hosts on each shard with k split over the shards (gTop-k by the recursive-doubling model of
  test_invariants, allgather the union of the hosts' top-k, CLT-k the leader host's top-k with
  the leader ``(step + shard) mod H``, dense the plain sum);
- every rank holds the same bits;
- error feedback is exact: the entries a rank calls sent are its own values where its host's
  sum entered the result, and what all ranks sent sums to the result;
- bytes to other hosts are counted apart, and with one host or one rank a host the call is
  the flat algorithm, bit for bit.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from sparsecoll.collectives.dense import chunk_bounds
from sparsecoll.collectives.hierarchical import _from_candidates
from sparsecoll.collectives.sparse_common import select
from tests.collectives.test_invariants import gtopk_reference, top_k
from tests.ranks import run_ranks

HOSTS = ("a", "a", "a", "b", "b", "c")
LAYOUTS = {"2+2": (0, 1, 3, 4), "3+1": (0, 1, 2, 3), "2+1+1": (0, 1, 3, 5), "all": tuple(range(6)),
           "one-host": (0, 1, 2), "one-rank-a-host": (0, 3, 5)}
ALGORITHMS = ("dense", "gtopk", "allgather", "cltk")
D, K, STEP = 103, 9, 5


def layout_hosts(members: tuple[int, ...]) -> list[list[int]]:
    """Group ranks per host, hosts by lowest rank (the topology's numbering)."""
    hosts: dict[str, list[int]] = {}
    for group_rank, member in enumerate(members):
        hosts.setdefault(HOSTS[member], []).append(group_rank)
    return list(hosts.values())


def gradients(size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(D) * 2
    return [(common + rng.standard_normal(D)).astype(np.float32) for _ in range(size)]


def two_level_reference(algorithm: str, grads: list[np.ndarray], hosts: list[list[int]]):
    """(result as a dense float32 vector, the indices each group rank sent) by the model."""
    shards = max(len(ranks) for ranks in hosts)
    bounds = chunk_bounds(D, shards)
    k_bounds = chunk_bounds(K, shards)
    result = np.zeros(D, np.float32)
    sent = [[] for _ in grads]
    selections = [top_k(np.arange(D), grad, K)[0] for grad in grads]
    for shard in range(shards):
        low, high = bounds[shard], bounds[shard + 1]
        count = k_bounds[shard + 1] - k_bounds[shard]
        sums = []
        for ranks in hosts:
            if algorithm in ("gtopk", "allgather"):  # the host sums its ranks' own top-k
                total = np.zeros(high - low, np.float32)
                for rank in ranks:
                    chosen = selections[rank][(selections[rank] >= low) & (selections[rank] < high)]
                    total[chosen - low] += grads[rank][chosen]
            else:
                total = grads[ranks[0]][low:high].copy()
                for rank in ranks[1:]:
                    total += grads[rank][low:high]
            sums.append(total)
        if algorithm == "dense":
            result[low:high] = np.sum(np.asarray(sums, np.float64), axis=0)
            host_sent = [np.arange(high - low)] * len(hosts)
        elif algorithm == "gtopk":
            (indices, values), host_sent = gtopk_reference(sums, count)
            result[low + indices] = values
        elif algorithm == "allgather":
            host_sent = [top_k(np.arange(high - low), total, count)[0] for total in sums]
            for chosen, total in zip(host_sent, sums):
                result[low + chosen] += total[chosen]
        else:
            leader = (STEP + shard) % len(hosts)
            chosen = top_k(np.arange(high - low), sums[leader], count)[0]
            result[low + chosen] = np.sum([total[chosen].astype(np.float64) for total in sums], axis=0)
            host_sent = [chosen] * len(hosts)
        for ranks, chosen in zip(hosts, host_sent):
            for rank in ranks:
                chosen_here = low + np.asarray(chosen, np.int64)
                if algorithm in ("gtopk", "allgather"):  # a rank sent only what it selected
                    chosen_here = np.intersect1d(chosen_here, selections[rank])
                sent[rank].append(chosen_here)
    return result, [np.sort(np.concatenate(parts)) for parts in sent]


CONCURRENT_SIZES = (30000, 40, 3000, 7)


async def concurrent_calls(group) -> bool:
    """Calls in flight together (as the optimizer's buckets are) give what they give one at a
    time; a rank that starts late must not change the order the sub-groups see them in."""
    grads = [np.random.default_rng(size + group.rank).standard_normal(size).astype(np.float32)
             for size in CONCURRENT_SIZES]
    alone = [await group.reduce_gradient(grad, "gtopk", density=0.1, hierarchical=True) for grad in grads]
    if group.rank % 2:
        await asyncio.sleep(0.05 * group.rank)
    together = await asyncio.gather(*(group.reduce_gradient(grad, "gtopk", density=0.1, hierarchical=True)
                                      for grad in grads))
    return all(np.array_equal(one.value.dense(), other.value.dense()) for one, other in zip(alone, together))


async def layouts_rank(group) -> dict:
    """Run every layout this rank belongs to; return what the parent checks, per layout."""
    report = {}
    for name, members in LAYOUTS.items():
        sub = group.new_group(members)
        if sub is None:
            continue
        grads = gradients(sub.size, seed=len(name))
        mine = grads[sub.rank]
        for algorithm in ALGORITHMS:
            options = {"exact": True} if algorithm == "gtopk" else {}
            result, stats = await sub.reduce_gradient(mine, algorithm, k=K, step=STEP, hierarchical=True, **options)
            flat, flat_stats = await sub.reduce_gradient(mine, algorithm, k=K, step=STEP, **options)
            report[name, algorithm] = {
                "bits": result.dense().tobytes(), "flat_bits": flat.dense().tobytes(),
                "sent_indices": np.sort(np.asarray(result.sent_indices if result.sent_indices is not None
                                                   else np.arange(D), np.int64)),
                "sent_values_are_mine": bool(np.array_equal(
                    result.sent_values, mine if result.sent_indices is None else mine[result.sent_indices])),
                "residual": result.residual(mine),
                "inter": stats.inter_host_bytes_sent, "total": stats.bytes_sent,
                "inter_received": stats.inter_host_bytes_received,
                "flat_inter": flat_stats.inter_host_bytes_sent,
                "flat_inter_received": flat_stats.inter_host_bytes_received,
            }
        if name == "all":
            report["concurrent"] = await concurrent_calls(sub)
            report["table"] = sub.topology.table.hosts
            groups = sub.topology.groups
            assert groups.scatter.members == groups.gather.members and groups.scatter is not groups.gather
            report["subgroups"] = (groups.scatter.members,
                                   {shard: child.members for shard, child in groups.inter.items()})
    return report


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    env = {rank: {"SPARSECOLL_HOST_ID": host} for rank, host in enumerate(HOSTS)}
    return run_ranks(len(HOSTS), layouts_rank, timeout=240, per_rank_env=env)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_two_levels_equal_the_model_on_every_rank(reports, layout: str, algorithm: str) -> None:
    members = LAYOUTS[layout]
    hosts = layout_hosts(members)
    grads = gradients(len(members), seed=len(layout))
    outcomes = [reports[member][layout, algorithm] for member in members]
    assert len({outcome["bits"] for outcome in outcomes}) == 1, "ranks disagree"
    got = np.frombuffer(outcomes[0]["bits"], np.float32)
    if len(hosts) == 1 or len(hosts) == len(members):  # the two levels would be one: the flat algorithm
        assert outcomes[0]["bits"] == outcomes[0]["flat_bits"]
        assert all(outcome["inter"] == outcome["flat_inter"] for outcome in outcomes)
        return
    expected, sent = two_level_reference(algorithm, grads, hosts)
    exact = algorithm in ("gtopk", "allgather")  # the model adds in the same order as the ranks
    if exact:
        np.testing.assert_array_equal(got, expected)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.flatnonzero(got != 0), np.flatnonzero(expected != 0)) or algorithm == "dense"
    total_sent = np.zeros(D, np.float64)
    for group_rank, outcome in enumerate(outcomes):
        np.testing.assert_array_equal(outcome["sent_indices"], sent[group_rank])
        assert outcome["sent_values_are_mine"]
        total_sent += grads[group_rank].astype(np.float64) - outcome["residual"]
    np.testing.assert_allclose(total_sent, got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["2+2", "3+1", "2+1+1"])
def test_bytes_to_other_hosts_are_counted_apart(reports, layout: str) -> None:
    """A rank alone on its host sends everything to other hosts; a rank with host mates sends
    some inside its host too; the flat algorithm's bytes are counted the same way."""
    members = LAYOUTS[layout]
    for algorithm in ALGORITHMS:
        for host in layout_hosts(members):
            for group_rank in host:
                outcome = reports[members[group_rank]][layout, algorithm]
                if len(host) == 1:
                    assert outcome["inter"] == outcome["total"] > 0
                else:
                    assert 0 < outcome["inter"] < outcome["total"]
        for prefix in ("", "flat_"):  # what leaves a host arrives at another one
            sent = sum(reports[member][layout, algorithm][prefix + "inter"] for member in members)
            received = sum(reports[member][layout, algorithm][prefix + "inter_received"] for member in members)
            assert sent == received > 0


def test_concurrent_calls_keep_their_order(reports) -> None:
    assert [report["concurrent"] for report in reports] == [True] * len(HOSTS)


def test_every_rank_agrees_on_the_hosts(reports) -> None:
    expected = tuple(tuple(ranks) for ranks in layout_hosts(LAYOUTS["all"]))
    assert [report["table"] for report in reports] == [expected] * len(HOSTS)


def test_sub_groups_follow_the_shard_owners(reports) -> None:
    """Layout 3+2+1 (ranks 0-2, 3-4, 5): three shards; on each host local rank j mod L_h owns
    shard j, and the owners of shard j form inter-host group j, ordered by host."""
    inter_groups = {0: (0, 3, 5), 1: (1, 4, 5), 2: (2, 3, 5)}
    for rank, report in enumerate(reports):
        local, inter = report["subgroups"]
        assert local == next(tuple(ranks) for ranks in ((0, 1, 2), (3, 4), (5,)) if rank in ranks)
        assert inter == {shard: members for shard, members in inter_groups.items() if rank in members}


def test_step_two_selects_among_the_summed_pairs_not_the_dense_shard() -> None:
    """The shard's top k/L comes from the at most k nonzero pairs of the host's sum: the set a
    read of the dense shard would give (ties to the lower index), without that read; with fewer
    pairs than k/L the dense selection decides (zeros enter its top)."""
    indices = np.array([3, 40, 41, 500, 999])
    values = np.array([1.0, -5.0, 2.0, 5.0, -0.5], np.float32)
    shard = np.zeros(1000, np.float32)
    shard[indices] = values

    def selection(dense: np.ndarray, count: int) -> tuple[list[int], list[float]]:
        async def between():
            return select(dense, count, "topk", None, None, 0)

        chosen, chosen_values = asyncio.run(_from_candidates(between(), dense, count, indices, values))
        return np.asarray(chosen).tolist(), np.asarray(chosen_values).tolist()

    dense_top = top_k(np.arange(1000), shard, 3)
    assert selection(shard, 3) == (dense_top[0].tolist(), dense_top[1].tolist()) == ([40, 41, 500], [-5.0, 2.0, 5.0])
    decoy = shard.copy()
    decoy[7] = 100.0  # not among the pairs: a read of the dense array would pick it
    assert 7 not in selection(decoy, 3)[0]
    assert 7 in selection(decoy, 6)[0]  # 6 > 5 pairs: the dense array is read

