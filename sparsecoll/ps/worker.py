"""The worker side of AsyLPG: pull b-bit parameters, push b-bit (optionally top-k) gradients.

See :mod:`sparsecoll.ps` for the algorithm; the step numbers below are its worker steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sparsecoll.compress import ParameterQuantizer, QuantizedPayload, QuantizeCodec
from sparsecoll.errors import FrameError, InvalidArgumentError
from sparsecoll.p2p import wait_all
from sparsecoll.kernels import topk

from .config import FULL_PRECISION, SHARD_SEED_STRIDE, AsyLPGConfig, shard_bounds
from .messages import REPLY_TAG, REQUEST_TAG, Kind, decode_values, encode_values, frame, parse

if TYPE_CHECKING:
    from sparsecoll.group import Group


@dataclass
class WorkerStats:
    """What one worker did: pushes sent and refused, pulls, bytes each way."""

    pushes: int = 0
    refused: int = 0
    pulls: int = 0
    bytes_pushed: int = 0
    bytes_pulled: int = 0


class ShardClient:
    """One worker's connection to one server rank (one shard); holds the quantized parameters it computes at.

    ``params`` is this shard's copy, x̂ = Q(x) as last received (float64, flat). Call
    :meth:`pull` once, then :meth:`push` with the gradient at ``params`` each step; each push
    returns the server's next parameters. :meth:`close` tells the server this worker left.
    ``shard`` only offsets the rounding seeds (shard 0 has the unsharded ones).
    """

    def __init__(self, group: Group, size: int, config: AsyLPGConfig, *, server: int = 0,
                 shard: int = 0, timeout: float | None = None) -> None:
        if server == group.rank or not 0 <= server < group.size:
            raise InvalidArgumentError(f"server {server} is not another rank of a group of {group.size}",
                                       rank=group.rank)
        self.group = group
        self.size = size
        self.config = config
        self.server = server
        self.timeout = timeout
        self.version = -1
        self.params = np.zeros(size)
        self.stats = WorkerStats()
        self.residual = np.zeros(size) if config.sparse else None
        seed = config.seed * 1009 + 7919 * (group.rank + 1) + SHARD_SEED_STRIDE * shard
        self.grad_codec = QuantizeCodec(config.grad_bits, block_size=config.block_size, seed=seed) \
            if config.grad_bits != FULL_PRECISION else None
        quantized = config.param_bits != FULL_PRECISION
        self.param_codec = QuantizeCodec(config.param_bits, block_size=config.block_size) if quantized else None
        self.delta = ParameterQuantizer(np.zeros(size), config.param_bits, block_size=config.block_size) \
            if quantized and config.param_encoding == "delta" else None
        self._closed = False

    async def pull(self) -> np.ndarray:
        """Step 1: ask for the parameters; returns this worker's (quantized) copy."""
        await self._request(frame(Kind.PULL, self.version, []))
        self.stats.pulls += 1
        return await self._receive()

    async def push(self, gradient: np.ndarray) -> np.ndarray:
        """Steps 2 and 4: send the gradient computed at ``params``; returns the next parameters.

        If the server refused it as too stale, the returned parameters are its current ones
        and ``stats.refused`` counts it; the caller just computes the next gradient there.
        """
        if self.version < 0:
            raise InvalidArgumentError("pull the parameters before the first push", rank=self.group.rank)
        flat = np.asarray(gradient, np.float64).reshape(-1)
        if flat.size != self.size:
            raise InvalidArgumentError(f"gradient of {flat.size} values for a model of {self.size}",
                                       rank=self.group.rank)
        await self._request(frame(Kind.PUSH, self.version, self._compress(flat)))
        self.stats.pushes += 1
        return await self._receive()

    async def close(self) -> None:
        """Step 5: tell the server this worker is done (idempotent; the group stays open)."""
        if not self._closed:
            self._closed = True
            await self._request(frame(Kind.DONE, self.version, []))

    def _compress(self, gradient: np.ndarray) -> list[np.ndarray]:
        """Step 2: top-k with error feedback when sparse, then ``grad_bits`` stochastic rounding."""
        step = self.stats.pushes
        if not self.config.sparse:
            return encode_values(gradient, self.config.grad_bits, self.grad_codec, step)
        self.residual += gradient
        indices, _ = topk(self.residual, self.config.pushed_count(self.size), method="exact")
        indices = np.sort(np.asarray(indices, np.int64))
        parts = encode_values(self.residual[indices], self.config.grad_bits, self.grad_codec, step)
        sent = self.residual[indices] if self.grad_codec is None else self._decoded(parts, indices.size)
        self.residual[indices] -= sent
        return [indices.astype(np.uint32)] + parts

    def _decoded(self, parts: list[np.ndarray], count: int) -> np.ndarray:
        packed, scales = parts
        return self.grad_codec.decode(QuantizedPayload(packed, scales, self.config.grad_bits,
                                                       self.config.block_size, count, np.dtype(np.float64)))

    async def _request(self, message: np.ndarray) -> None:
        await self.group.send(message, self.server, REQUEST_TAG, timeout=self.timeout)
        self.stats.bytes_pushed += message.nbytes

    async def _receive(self) -> np.ndarray:
        """Steps 1 and 4 on the worker: decode x̂ = Q(x) and remember its version."""
        message = await self.group.recv(self.server, REPLY_TAG, timeout=self.timeout)
        self.stats.bytes_pulled += message.value.nbytes
        try:
            kind, version, body = parse(message.value, self.server, self.group.rank)
            if kind not in (Kind.PARAMS, Kind.REFUSED):
                raise FrameError(f"the server sent a worker message kind {kind.name}",
                                 rank=self.group.rank, peer=self.server)
            params = self._decode_params(body)
        except FrameError as error:  # the server and this worker disagree: fail every rank
            self.group.poison(error)
            raise
        self.stats.refused += kind == Kind.REFUSED
        self.version = version
        self.params = params
        return self.params

    def _decode_params(self, body: np.ndarray) -> np.ndarray:
        config, rank = self.config, self.group.rank
        if self.delta is None:
            return decode_values(body, self.size, config.param_bits, self.param_codec, config, self.server, rank)
        expected = config.values_bytes(self.size, config.param_bits)
        if body.size != expected:
            raise FrameError(f"parameters of {body.size} bytes, expected {expected}", rank=rank, peer=self.server)
        packed_bytes = expected - 4 * -(-self.size // config.block_size)
        payload = QuantizedPayload(body[:packed_bytes], body[packed_bytes:].view(np.float32), config.param_bits,
                                   config.block_size, self.size, np.dtype(np.float64))
        return self.delta.decode(payload)


class Worker:
    """One worker rank of AsyLPG: a :class:`ShardClient` per server rank, driven together.

    ``params`` is this worker's whole copy, x̂ = Q(x) as last received (float64, flat). Call
    :meth:`pull` once, then :meth:`push` with the gradient at ``params`` each step; each push
    returns the server's next parameters. :meth:`close` tells the server(s) this worker left.

    With ``config.num_servers`` = n > 1 the servers are ranks 0 .. n - 1 and this worker (a
    rank >= n) pulls and pushes every shard concurrently: the gradient is cut at
    ``shard_bounds`` and each piece goes to its shard's server, which may refuse it (staleness
    is per shard). ``shards`` holds each shard's client and stats; ``stats`` counts this
    worker's pulls and pushes once each, the refusals and bytes of all shards together.
    """

    def __init__(self, group: Group, size: int, config: AsyLPGConfig, *, server: int = 0,
                 timeout: float | None = None) -> None:
        servers = config.num_servers
        if servers > 1 and server != 0:
            raise InvalidArgumentError(f"with num_servers={servers} the servers are ranks 0..{servers - 1}; "
                                       f"server={server} cannot move them", rank=group.rank)
        if servers > 1 and group.rank < servers:
            raise InvalidArgumentError(f"rank {group.rank} is one of the {servers} server ranks, not a worker",
                                       rank=group.rank)
        self.group = group
        self.size = size
        self.bounds = shard_bounds(size, servers)
        ranks = range(servers) if servers > 1 else [server]
        self.shards = [ShardClient(group, stop - start, config, server=rank, shard=index, timeout=timeout)
                       for index, (rank, (start, stop)) in enumerate(zip(ranks, self.bounds))]
        self._calls = WorkerStats()

    @property
    def params(self) -> np.ndarray:
        """This worker's copy of the whole parameter vector."""
        if len(self.shards) == 1:
            return self.shards[0].params
        return np.concatenate([shard.params for shard in self.shards])

    @property
    def version(self) -> int:
        """The oldest shard version this worker holds (-1 before the first pull)."""
        return min(shard.version for shard in self.shards)

    @property
    def residual(self) -> np.ndarray | None:
        """The error-feedback residual of a sparse worker (whole vector), else None."""
        if self.shards[0].residual is None:
            return None
        if len(self.shards) == 1:
            return self.shards[0].residual
        return np.concatenate([shard.residual for shard in self.shards])

    @property
    def stats(self) -> WorkerStats:
        """Pulls and pushes as this worker's calls; refusals and bytes summed over the shards."""
        if len(self.shards) == 1:
            return self.shards[0].stats
        total = WorkerStats(pulls=self._calls.pulls, pushes=self._calls.pushes)
        for name in ("refused", "bytes_pushed", "bytes_pulled"):
            setattr(total, name, sum(getattr(shard.stats, name) for shard in self.shards))
        return total

    async def pull(self) -> np.ndarray:
        """Step 1 on every shard; returns this worker's (quantized) copy."""
        await self._each(lambda shard, _: shard.pull())
        self._calls.pulls += 1
        return self.params

    async def push(self, gradient: np.ndarray) -> np.ndarray:
        """Steps 2 and 4 on every shard (concurrently); returns the next parameters."""
        flat = np.asarray(gradient, np.float64).reshape(-1)
        if flat.size != self.size:
            raise InvalidArgumentError(f"gradient of {flat.size} values for a model of {self.size}",
                                       rank=self.group.rank)
        await self._each(lambda shard, bounds: shard.push(flat[slice(*bounds)]))
        self._calls.pushes += 1
        return self.params

    async def close(self) -> None:
        """Step 5 on every shard (idempotent)."""
        await self._each(lambda shard, _: shard.close())

    async def _each(self, call: Callable[[ShardClient, tuple[int, int]], Coroutine]) -> None:
        """Run ``call`` on every shard at once; the first error cancels the rest and is raised."""
        if len(self.shards) == 1:
            await call(self.shards[0], self.bounds[0])
            return
        await wait_all(asyncio.ensure_future(call(shard, bounds)) for shard, bounds in zip(self.shards, self.bounds))
