"""Emulated slow links: one network namespace per host, joined by a bridge, each link shaped.

Every rank's namespace holds one end of a veth pair whose other end sits on a bridge in a
switch namespace; ``tc tbf`` shapes both directions of every pair to the chosen rate, so each
rank has its own full-duplex link, as on a real switch. Everything lives in namespaces this
module creates and always deletes (also when the body fails); no address outside them is
used. With ``ranks_per_host`` L, ranks ``h*L .. h*L+L-1`` share host h's namespace: they reach
each other over its loopback (unshaped, like the fast links inside a real host) and share its
one shaped link to the others, as the ranks of a real host share its network card. ``"1gbit,5ms"`` also delays every rank-to-rank packet by 5 ms one way (netem, half on
each hop, with tbf under it); a kernel without the netem qdisc gets a clear error. Root only;
:func:`shaping_problem` says beforehand whether this machine can build them, and why not.

    with EmulatedNetwork(4, "1gbit") as net:
        net.address(0)            # "10.213.0.1", rank 0's address inside its namespace
        enter_namespace(net.namespace(0))   # in a child process, before opening sockets
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
from types import TracebackType

from sparsecoll.errors import InvalidArgumentError

CLONE_NEWNET = 0x40000000
SUBNET = "10.213.0"


def parse_rate(text: str) -> str:
    """'1gbit', '10gbit', '100mbit' (tc's units), checked."""
    rate = text.strip().lower()
    if not re.fullmatch(r"\d+(\.\d+)?(k|m|g)?bit", rate):
        raise InvalidArgumentError(f"link rate {text!r} is not like 1gbit, 10gbit or 100mbit")
    return rate


def parse_link(text: str) -> tuple[str, str | None]:
    """'1gbit' or '1gbit,5ms' (rate, and one-way delay in tc's time units), checked."""
    rate, _, delay = text.partition(",")
    delay = delay.strip().lower() or None
    if delay is not None and not re.fullmatch(r"\d+(\.\d+)?(us|ms|s)", delay):
        raise InvalidArgumentError(f"link latency {delay!r} is not like 500us, 5ms or 0.1s")
    return parse_rate(rate), delay


def _half(delay: str) -> str:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", delay).groups()
    return f"{float(number) / 2:g}{unit}"


def _rate_bits(rate: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(k|m|g)?bit", rate).groups()
    return float(number) * {None: 1, "k": 1e3, "m": 1e6, "g": 1e9}[unit]


def _run(*argv: str) -> None:
    """Run one ``ip``/``tc`` step; a refusal (a kernel without bridges, veth or tbf) becomes one
    clear error that names the step and what it answered."""
    step = subprocess.run(argv, capture_output=True, text=True)
    if step.returncode != 0:
        answer = (step.stderr or step.stdout).strip() or f"exit status {step.returncode}"
        raise InvalidArgumentError(f"this machine cannot build emulated links: `{' '.join(argv)}` answered "
                                   f"{answer!r}")


def shaping_problem() -> str | None:
    """Why emulated links cannot be built here (not root, no ``ip``/``tc``, a kernel that
    refuses a bridge, veth or tbf), or None when they can: the probe builds one shaped link
    in namespaces of its own and deletes them, so it leaves nothing behind either way."""
    try:
        with EmulatedNetwork(1, "1gbit", prefix=f"sc{os.getpid() % 100000}p"):
            return None
    except (InvalidArgumentError, PermissionError, FileNotFoundError) as error:
        return str(error)


class EmulatedNetwork:
    """``ranks`` namespaces on a shaped bridge; a context manager that cleans up after itself."""

    def __init__(self, ranks: int, rate: str = "1gbit", prefix: str | None = None, ranks_per_host: int = 1) -> None:
        if os.geteuid() != 0:
            raise PermissionError("emulated links need root (network namespaces and tc)")
        if shutil.which("ip") is None or shutil.which("tc") is None:
            raise FileNotFoundError("emulated links need iproute2's ip and tc")
        if not 1 <= ranks <= 200:
            raise InvalidArgumentError(f"ranks must be in [1, 200], not {ranks}")
        if ranks_per_host < 1 or ranks % ranks_per_host:
            raise InvalidArgumentError(f"{ranks} ranks do not fill hosts of {ranks_per_host} ranks each")
        self.ranks = ranks
        self.ranks_per_host = ranks_per_host
        self.hosts = ranks // ranks_per_host
        self.rate, self.delay = parse_link(rate)
        self.prefix = prefix or f"sc{os.getpid() % 100000}"
        self._created: list[str] = []

    def host_of(self, rank: int) -> int:
        """The emulated host rank ``rank`` runs on."""
        return rank // self.ranks_per_host

    def namespace(self, rank: int) -> str:
        """Name of rank ``rank``'s namespace (its host's)."""
        return f"{self.prefix}-r{self.host_of(rank)}"

    def address(self, rank: int) -> str:
        """Rank ``rank``'s address inside its namespace (its host's)."""
        return f"{SUBNET}.{self.host_of(rank) + 1}"

    def interface(self, rank: int) -> str:
        """Name of the rank's network interface inside its namespace (its host's)."""
        return f"{self.prefix}v{self.host_of(rank)}"[:15]

    def __enter__(self) -> EmulatedNetwork:
        # a SIGTERM (timeout, kill) must still run __exit__, or the namespaces outlive us
        self._previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _build(self) -> None:
        switch = f"{self.prefix}-sw"
        self._add_namespace(switch)
        _run("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", switch, "link", "set", "br0", "up")
        burst = max(32_000, int(_rate_bits(self.rate) / 8 / 250))  # at least one timer tick's worth
        for host in range(self.hosts):
            rank = host * self.ranks_per_host
            namespace, inside, outside = self.namespace(rank), self.interface(rank), f"{self.prefix}s{host}"[:15]
            self._add_namespace(namespace)
            _run("ip", "link", "add", inside, "netns", namespace, "type", "veth", "peer", "name", outside,
                 "netns", switch)
            _run("ip", "-n", switch, "link", "set", outside, "master", "br0", "up")
            _run("ip", "-n", namespace, "addr", "add", f"{self.address(rank)}/24", "dev", inside)
            _run("ip", "-n", namespace, "link", "set", inside, "up")
            _run("ip", "-n", namespace, "link", "set", "lo", "up")
            for ns, device in ((namespace, inside), (switch, outside)):
                self._shape(ns, device, burst)

    def _shape(self, namespace: str, device: str, burst: int) -> None:
        """tbf at the link's rate on ``device``; under netem's delay when the link has one."""
        tc = ("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device)
        tbf = ("tbf", "rate", self.rate, "burst", str(burst), "latency", "50ms")
        if self.delay is None:
            _run(*tc, "root", *tbf)
            return
        try:
            _run(*tc, "root", "handle", "1:", "netem", "delay", _half(self.delay), "limit", "100000")
        except InvalidArgumentError as error:
            raise InvalidArgumentError(
                f"added latency needs the kernel's netem qdisc, which tc could not use here "
                f"({error}); use --link {self.rate} without a delay") from None
        _run(*tc, "parent", "1:1", "handle", "10:", *tbf)

    def _add_namespace(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._created.append(name)

    def close(self) -> None:
        """Delete every namespace this network created (their links go with them)."""
        while self._created:
            subprocess.run(["ip", "netns", "delete", self._created.pop()], capture_output=True)
        if getattr(self, "_previous_handler", None) is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def enter_namespace(name: str) -> None:
    """Move the calling process (all its future sockets) into network namespace ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/var/run/netns/{name}") as handle:
        if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")
