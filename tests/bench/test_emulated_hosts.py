"""Emulated hosts in the bench: ranks grouped into hosts (SPARSECOLL_HOST_ID, one namespace a
host with links), and the sparse bench's two-level rows against their byte formulas."""

from __future__ import annotations

import os
import subprocess

import pytest

from sparsecoll.bench import checks
from sparsecoll.bench.netem import EmulatedNetwork
from sparsecoll.bench.ranks import host_env, run_ranks
from sparsecoll.errors import InvalidArgumentError


def test_host_env_groups_consecutive_ranks() -> None:
    assert host_env(4, 1) == {}
    assert host_env(6, 3) == {rank: {"SPARSECOLL_HOST_ID": f"emulated-host-{rank // 3}"} for rank in range(6)}
    with pytest.raises(InvalidArgumentError, match="does not divide"):
        host_env(6, 4)
    with pytest.raises(InvalidArgumentError, match="does not divide --ranks 6"):
        checks.ranks_per_host(4, [8, 6])


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_one_namespace_a_host_and_nothing_left_behind() -> None:
    prefix = f"eh{os.getpid() % 100000}"
    with EmulatedNetwork(4, "1gbit", prefix=prefix, ranks_per_host=2) as net:
        listed = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
        assert sorted(line.split()[0] for line in listed.splitlines() if line.startswith(prefix)) == \
            [f"{prefix}-r0", f"{prefix}-r1", f"{prefix}-sw"]
        assert net.namespace(0) == net.namespace(1) != net.namespace(2) == net.namespace(3)
        assert net.address(1) == "10.213.0.1" and net.address(2) == "10.213.0.2"
        shaped = subprocess.run(["ip", "netns", "exec", net.namespace(0), "tc", "qdisc", "show", "dev",
                                 net.interface(1)], check=True, capture_output=True, text=True).stdout
        assert "tbf" in shaped and "1Gbit" in shaped  # the host's one link to the others is shaped
    with pytest.raises(InvalidArgumentError, match="do not fill hosts"):
        EmulatedNetwork(5, "1gbit", prefix=prefix, ranks_per_host=2)
    assert prefix not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_two_level_rows_send_their_formula_to_other_hosts() -> None:
    from sparsecoll.bench import sparse

    _, rows = run_ranks(4, sparse.run_rank, 40_000, 0.01, ["allgather", "gtopk"], 1, 2, "both", timeout=240,
                        ranks_per_host=2)
    by_name = {row["algorithm"]: row for row in rows}
    assert set(by_name) == {"allgather", "allgather 2-level", "gtopk", "gtopk 2-level"}
    for name in ("allgather", "gtopk"):
        two_level = by_name[f"{name} 2-level"]
        assert (two_level["hosts"], two_level["ranks_per_host"]) == (2, 2)
        assert two_level["inter_host_bytes"] == two_level["formula_inter_bytes"]
        assert two_level["wrong"] == 0 and by_name[name]["wrong"] == 0
        assert two_level["inter_host_bytes"] < by_name[name]["inter_host_bytes"]
