"""Set-up against strangers and scarce resources, over TCP and UCX: forged HELLOs naming a
real rank (hang-up, refused proof, bad signature) before and after the genuine rank's,
``accept()`` failing with EMFILE under a real file-descriptor limit (TCP), and
SPARSECOLL_PORT_RANGE. One spawn of three ranks per backend; each test reads its part."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
from datetime import timedelta

import numpy as np
import pytest

from sparsecoll.errors import InvalidArgumentError
from sparsecoll.transport.base import port_range
from tests.ranks import run_ranks

FORGERIES = ("hang-up", "refused proof", "bad signature")
EMFILE_SECONDS = 1.0


async def _setup(rank: int, world: int, before_connect=None):
    """``init_group``'s steps, with a hook between the address exchange and the connect."""
    from sparsecoll.group import Group
    from sparsecoll.rendezvous import Rendezvous, resolve
    from sparsecoll.transport import transport_class
    from sparsecoll.transport.handshake import group_id_for

    backend = os.environ["SPARSECOLL_BACKEND"]
    membership = resolve(None, rank, world, None, 30.0)
    rendezvous = Rendezvous(membership, "default", 30.0)
    prefix = await rendezvous.join()
    secret = await rendezvous.secret(os.environ["SPARSECOLL_SECRET"].encode())
    holder: list = []

    def on_failure(error) -> None:
        if holder:
            holder[0].poison(error)
        else:
            transport.mailbox.fail(error)

    transport = transport_class(backend)(rank, world, secret=secret, group_id=group_id_for(prefix),
                                         on_failure=on_failure)
    address = await transport.listen("127.0.0.1")
    addresses = await rendezvous.exchange_addresses(address)
    if before_connect is not None:
        await before_connect(transport, membership.store, addresses, prefix)
    await transport.connect(addresses, 20.0)
    group = Group(rank, world, transport, timeout=30.0, backend=backend, store=membership.store)
    holder.append(group)
    if transport.mailbox.error is not None:
        group.poison(transport.mailbox.error)
    return group, address


async def _forge(address: str, prefix: str, how: str, claimed: int, world: int) -> str:
    """Speak the handshake to ``address`` as rank ``claimed`` without knowing the secret."""
    from sparsecoll.transport.handshake import (
        _CHALLENGE, _HELLO, _PROOF, MAC_SIZE, NONCE_SIZE, SocketChannel, _read_frame, _write_frame,
        group_id_for)
    from sparsecoll.wire import Kind

    host, port = address.rsplit(":", 1)
    if os.environ["SPARSECOLL_BACKEND"] == "ucx":
        from sparsecoll.transport import ucx_runtime

        endpoint = await ucx_runtime.create_endpoint(host, int(port), 5.0)
        channel, close = ucx_runtime.UcxChannel(endpoint), lambda: ucx_runtime.close_endpoint(endpoint)
    else:
        sock = socket.create_connection((host, int(port)))
        sock.setblocking(False)
        channel = SocketChannel(sock)

        async def close() -> None:
            sock.close()
    try:
        hello = _HELLO.pack(group_id_for(prefix), os.urandom(NONCE_SIZE), claimed, world, 0)
        await _write_frame(channel, Kind.HELLO, hello)
        if how == "hang-up":
            return "sent"
        await _read_frame(channel, Kind.CHALLENGE, _CHALLENGE.size)
        if how == "refused proof":
            await _write_frame(channel, Kind.PROOF, _PROOF.pack(0, bytes(MAC_SIZE)))
            return "refused"
        await _write_frame(channel, Kind.PROOF, _PROOF.pack(1, os.urandom(MAC_SIZE)))
        return "verdict %d" % (await _read_frame(channel, Kind.VERDICT, 1))[0]
    finally:
        await close()


def _exhaust_descriptors() -> list[int]:
    """Lower the soft RLIMIT_NOFILE to the descriptors in use and fill every hole below it,
    so that the next ``accept()`` fails with EMFILE for real."""
    in_use = [int(name) for name in os.listdir("/proc/self/fd")]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(in_use) + 1, hard))
    fillers = []
    while True:
        try:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            return fillers


def _restore_descriptors(fillers: list[int], soft: int) -> None:
    for descriptor in fillers:
        os.close(descriptor)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


async def hostile_setup(rank: int, world: int) -> dict:
    outcome: dict = {}
    loop = asyncio.get_running_loop()

    async def rank_zero_hook(transport, store, addresses, prefix) -> None:
        async def announce_rank_one() -> None:
            while 1 not in transport._connections:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(store.set, "hostile/rank1-in", "1")

        asyncio.ensure_future(announce_rank_one())
        if os.environ["SPARSECOLL_BACKEND"] == "tcp":
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            fillers = _exhaust_descriptors()
            outcome["descriptors filled"] = len(fillers)
            loop.call_later(EMFILE_SECONDS, _restore_descriptors, fillers, soft)

    async def stranger_before(prefix: str, store) -> None:
        await asyncio.to_thread(store.wait, [f"{prefix}/addr/0"], timedelta(seconds=20))
        address = bytes(await asyncio.to_thread(store.get, f"{prefix}/addr/0")).decode()
        ucx = os.environ["SPARSECOLL_BACKEND"] == "ucx"
        if ucx:
            from sparsecoll.transport import ucx_runtime

            ucx_runtime.acquire(rank)
        try:
            outcome["before"] = [await asyncio.wait_for(_forge(address, prefix, how, 1, world), 10)
                                 for how in FORGERIES]
        finally:
            if ucx:
                ucx_runtime.release()

    async def rank_two_hook(transport, store, addresses, prefix) -> None:
        await asyncio.to_thread(store.wait, ["hostile/rank1-in"], timedelta(seconds=20))
        outcome["after"] = [await asyncio.wait_for(_forge(addresses[0], prefix, how, 1, world), 10)
                            for how in FORGERIES]

    hook = {0: rank_zero_hook, 2: rank_two_hook}.get(rank)
    if rank == 2:
        # the strangers come before rank 2 publishes its address, so before rank 1 connects
        from sparsecoll.rendezvous import resolve

        store = resolve(None, rank, world, None, 30.0).store
        await stranger_before("sparsecoll/default/0", store)
    group, address = await _setup(rank, world, hook)
    async with group:
        value, _ = await group.allreduce(np.full(1000, rank + 1, np.float32))
        outcome["sum"] = float(value[0])
        outcome["port"] = int(address.rsplit(":", 1)[1])
        outcome["strays"] = group.transport.strays.count
        outcome["rejected"] = sorted({type(error).__name__ for error in group.transport.rejected})
        failures = getattr(group.transport, "_accept_failures", None)
        outcome["accept failures"] = failures.count if failures is not None else None
    return outcome


_OUTCOMES: dict[str, tuple] = {}


def _hostile(backend: str) -> tuple[list[dict], range]:
    if backend not in _OUTCOMES:
        ports = _free_port_range(12)
        with socket.socket() as busy:  # the range's first port is taken: listeners skip it
            busy.bind(("127.0.0.1", ports.start))
            busy.listen(1)
            results = run_ranks(3, hostile_setup, timeout=120, group_kwargs=None,
                                env={"SPARSECOLL_PORT_RANGE": f"{ports.start}-{ports.stop - 1}"})
        _OUTCOMES[backend] = results, ports
    return _OUTCOMES[backend]


def _free_port_range(length: int) -> range:
    """A run of ports the kernel would hand out now (from a free port found by binding 0)."""
    for _attempt in range(20):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            start = probe.getsockname()[1]
        if start + length <= 65535:
            return range(start, start + length)
    raise RuntimeError("no free port range")


def test_forged_hellos_before_and_after_the_real_rank_leave_set_up_intact(backend: str) -> None:
    results, _ = _hostile(backend)
    assert [outcome["sum"] for outcome in results] == [6.0] * 3, results
    stranger = results[2]
    assert stranger["before"] == stranger["after"] == ["sent", "refused", "verdict 0"], stranger
    assert results[0]["strays"] >= 2 * len(FORGERIES), results[0]
    assert "AuthenticationError" in results[0]["rejected"], results[0]


def test_accept_fails_with_emfile_and_a_later_peer_still_connects(backend: str) -> None:
    if backend != "tcp":
        pytest.skip("UCX accepts connections inside UCX; only the TCP listener calls accept()")
    results, _ = _hostile(backend)
    assert results[0]["descriptors filled"] > 0 and results[0]["accept failures"] >= 1, results[0]
    assert [outcome["sum"] for outcome in results] == [6.0] * 3, results


def test_listeners_bind_in_sparsecoll_port_range(backend: str) -> None:
    results, ports = _hostile(backend)
    bound = [outcome["port"] for outcome in results]
    assert all(port in ports[1:] for port in bound) and len(set(bound)) == 3, (bound, ports)


@pytest.mark.parametrize("setting", ["abc", "29600-29500", "0-10", "70000", "1-2-3"])
def test_a_bad_port_range_is_a_clear_error(setting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSECOLL_PORT_RANGE", setting)
    with pytest.raises(InvalidArgumentError, match="SPARSECOLL_PORT_RANGE"):
        port_range()


def test_port_range_parses_a_range_or_one_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSECOLL_PORT_RANGE", " 29500-29502 ")
    assert port_range() == range(29500, 29503)
    monkeypatch.setenv("SPARSECOLL_PORT_RANGE", "29500")
    assert port_range() == range(29500, 29501)
    monkeypatch.delenv("SPARSECOLL_PORT_RANGE")
    assert port_range() is None
