"""Emulated links: rate and delay parsing, and what a kernel without netem says."""

from __future__ import annotations

import os
import subprocess

import pytest

from sparsecoll.bench.netem import EmulatedNetwork, parse_link
from sparsecoll.errors import InvalidArgumentError


def test_links_parse_as_rate_and_optional_one_way_delay() -> None:
    assert parse_link("1gbit") == ("1gbit", None)
    assert parse_link("10Gbit, 5ms") == ("10gbit", "5ms")
    assert parse_link("100mbit,250us") == ("100mbit", "250us")
    for text in ("fast", "1gbit,5", "1gbit,soon", "1gb"):
        with pytest.raises(InvalidArgumentError):
            parse_link(text)


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_a_delayed_link_is_delayed_or_refused_clearly() -> None:
    prefix = f"nt{os.getpid() % 100000}"
    try:
        with EmulatedNetwork(2, "100mbit,4ms", prefix=prefix) as net:
            ping = subprocess.run(["ip", "netns", "exec", net.namespace(0), "ping", "-c", "3", "-i", "0.2",
                                   net.address(1)], capture_output=True, text=True, check=True).stdout
            rtt = float(ping.rsplit("=", 1)[1].split("/")[1])  # rtt min/avg/max/mdev = a/b/c/d ms
            assert rtt >= 8.0, ping  # 4 ms each way
    except InvalidArgumentError as error:  # this kernel has no netem: say so, build nothing
        assert "netem" in str(error)
        assert prefix not in _namespaces()
        pytest.skip(f"no netem here (refused clearly, nothing left behind): {error}")
    assert prefix not in _namespaces()
