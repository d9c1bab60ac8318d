"""The server side of AsyLPG: full-precision parameters, one update per gradient as it arrives.

See :mod:`sparsecoll.ps` for the algorithm; the step numbers below are its server steps.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from sparsecoll.compress import ParameterQuantizer, QuantizedPayload, QuantizeCodec
from sparsecoll.errors import FrameError, InvalidArgumentError
from sparsecoll.p2p import wait_all
from sparsecoll.transport.mailbox import ANY_SOURCE

from .config import FULL_PRECISION, SHARD_SEED_STRIDE, AsyLPGConfig, shard_bounds
from .messages import REPLY_TAG, REQUEST_TAG, Kind, decode_values, encode_values, frame, parse, split_indices

if TYPE_CHECKING:
    from sparsecoll.group import Group

SHARD_TAG = 0x50530003
"""p2p tag of a server's final shard, sent to the other server ranks when the session ends."""


@dataclass
class ServerStats:
    """What the server saw: updates applied, pushes refused as too stale, bytes each way."""

    updates: int = 0
    refused: int = 0
    pulls: int = 0
    max_applied_staleness: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    staleness_histogram: dict[int, int] = field(default_factory=dict)


class ParameterEncoder:
    """The server's end of one worker's parameter stream (steps 1 and 4: Q(x) at ``param_bits``)."""

    def __init__(self, config: AsyLPGConfig, size: int, worker: int, shard: int = 0) -> None:
        self.config = config
        seed = config.seed * 1009 + worker + SHARD_SEED_STRIDE * shard
        quantized = config.param_bits != FULL_PRECISION
        self.delta = ParameterQuantizer(np.zeros(size), config.param_bits, block_size=config.block_size,
                                        seed=seed) if quantized and config.param_encoding == "delta" else None
        self.codec = QuantizeCodec(config.param_bits, block_size=config.block_size, seed=seed) \
            if quantized and self.delta is None else None
        self.step = 0

    def encode(self, params: np.ndarray) -> list[np.ndarray]:
        """The parts of a parameter message for this worker."""
        self.step += 1
        if self.config.param_bits == FULL_PRECISION:
            return [np.asarray(params, np.float32)]
        if self.delta is not None:
            payload: QuantizedPayload = self.delta.encode(params)
            return [payload.packed, np.asarray(payload.scales, np.float32)]
        return encode_values(params, self.config.param_bits, self.codec, self.step)


class ParameterServer:
    """Serves ``initial`` parameters to every other rank of ``group`` until each has left.

    With ``config.num_servers`` > 1 this rank (one of ranks 0 .. num_servers - 1) serves only
    its shard of ``initial`` (``shard_bounds``), to the worker ranks (num_servers ..): a shard
    is a parameter server of its own, with its own version and staleness bound.

    Each message is handled as it arrives from any worker (no barrier between workers); every
    wait has the group's deadline (or ``timeout``), so a stalled worker raises
    ``CollectiveTimeoutError`` and a dead one ``PeerLostError`` here and, through the group's
    abort, on the other workers.
    """

    def __init__(self, group: Group, initial: np.ndarray, config: AsyLPGConfig, *,
                 timeout: float | None = None) -> None:
        servers = config.num_servers
        if group.size <= servers:
            raise InvalidArgumentError(f"{servers} server rank(s) in a group of {group.size} leave no worker",
                                       rank=group.rank)
        if servers > 1 and group.rank >= servers:
            raise InvalidArgumentError(f"rank {group.rank} is a worker: the {servers} servers are ranks "
                                       f"0..{servers - 1}", rank=group.rank)
        self.group = group
        self.config = config
        self.timeout = timeout
        flat = np.array(initial, np.float64).reshape(-1)
        self.full_size = flat.size
        self.shard = group.rank if servers > 1 else 0
        start, stop = shard_bounds(flat.size, servers)[self.shard]
        self.params = flat[start:stop].copy()
        self.workers = set(range(servers, group.size)) if servers > 1 else set(range(group.size)) - {group.rank}
        self.lookahead = self.params.copy()  # y_t of the accelerated update
        self.version = 0
        self.stats = ServerStats()
        self.encoders: dict[int, ParameterEncoder] = {}
        self.grad_codec = QuantizeCodec(config.grad_bits, block_size=config.block_size) \
            if config.grad_bits != FULL_PRECISION else None

    async def serve(self) -> np.ndarray:
        """Answer pulls and pushes in arrival order until every worker sent DONE (step 5); returns x.

        A malformed message (a worker with another model size or bit width) poisons the group,
        as a malformed frame does, so every worker raises it too instead of waiting for a reply.
        """
        try:
            return await self._serve()
        except FrameError as error:
            self.group.poison(error)
            raise

    async def _serve(self) -> np.ndarray:
        active = set(self.workers)
        while active:
            message = await self.group.recv(ANY_SOURCE, REQUEST_TAG, timeout=self.timeout)
            worker = message.source
            self.stats.bytes_received += message.value.nbytes
            kind, version, body = parse(message.value, worker, self.group.rank)
            if worker not in self.workers:
                raise FrameError(f"{kind.name} from rank {worker}, which is not a worker of this server",
                                 rank=self.group.rank, peer=worker)
            if worker not in active:
                raise FrameError(f"{kind.name} from a worker that already left (start the next session "
                                 "after a barrier)", rank=self.group.rank, peer=worker)
            if kind == Kind.DONE:
                active.discard(worker)
            elif kind == Kind.PULL:
                self.stats.pulls += 1
                await self._reply(worker, Kind.PARAMS)
            elif kind == Kind.PUSH:
                accepted = self._apply(worker, version, body)
                await self._reply(worker, Kind.PARAMS if accepted else Kind.REFUSED)
            else:
                raise FrameError(f"a worker sent a server message kind {kind.name}",
                                 rank=self.group.rank, peer=worker)
        return self.params.copy()

    def _apply(self, worker: int, base_version: int, body: np.ndarray) -> bool:
        """Step 3: refuse a gradient older than τ updates, else take one (accelerated) step."""
        staleness = self.version - base_version
        if not 0 <= staleness:
            raise FrameError(f"push at version {base_version} from the future (server at {self.version})",
                             rank=self.group.rank, peer=worker)
        gradient = self._decode_gradient(worker, body)
        if staleness > self.config.staleness:
            self.stats.refused += 1
            return False
        lookahead = self.params - self.config.lr * gradient
        if self.config.momentum:
            self.params = lookahead + self.config.momentum * (lookahead - self.lookahead)
        else:
            self.params = lookahead
        self.lookahead = lookahead
        self.version += 1
        self.stats.updates += 1
        self.stats.max_applied_staleness = max(self.stats.max_applied_staleness, staleness)
        self.stats.staleness_histogram[staleness] = self.stats.staleness_histogram.get(staleness, 0) + 1
        return True

    def _decode_gradient(self, worker: int, body: np.ndarray) -> np.ndarray:
        size, rank = self.params.size, self.group.rank
        count = self.config.pushed_count(size)
        if not self.config.sparse:
            return decode_values(body, count, self.config.grad_bits, self.grad_codec, self.config, worker, rank)
        indices, rest = split_indices(body, count, size, worker, rank)
        values = decode_values(rest, count, self.config.grad_bits, self.grad_codec, self.config, worker, rank)
        gradient = np.zeros(size)
        np.add.at(gradient, indices, values)
        return gradient

    async def _reply(self, worker: int, kind: Kind) -> None:
        """Steps 1 and 4: the parameters, quantized for this worker, with the version they are at."""
        encoder = self.encoders.get(worker)
        if encoder is None:
            encoder = self.encoders[worker] = ParameterEncoder(self.config, self.params.size, worker, self.shard)
        message = frame(kind, self.version, encoder.encode(self.params))
        await self.group.send(message, worker, REPLY_TAG, timeout=self.timeout)
        self.stats.bytes_sent += message.nbytes


    async def assemble(self, shard: np.ndarray) -> np.ndarray:
        """The whole final vector on every server rank: each sends its shard to the others (step 5)."""
        servers = range(self.config.num_servers)
        bounds = shard_bounds(self.full_size, self.config.num_servers)
        whole = np.empty(self.full_size)
        whole[slice(*bounds[self.shard])] = shard
        others = [rank for rank in servers if rank != self.group.rank]
        sends = [asyncio.ensure_future(self.group.send(shard, rank, SHARD_TAG, timeout=self.timeout))
                 for rank in others]
        receives = [asyncio.ensure_future(self.group.recv(rank, SHARD_TAG, timeout=self.timeout))
                    for rank in others]
        for rank, message in zip(others, (await wait_all(sends + receives))[len(sends):]):
            part = np.asarray(message.value)
            start, stop = bounds[rank]
            if part.dtype != np.float64 or part.size != stop - start:
                raise FrameError(f"server {rank}'s final shard has {part.size} {part.dtype} values, "
                                 f"expected {stop - start} float64", rank=self.group.rank, peer=rank)
            whole[start:stop] = part
        return whole


async def serve(group: Group, initial: np.ndarray, config: AsyLPGConfig, *,
                timeout: float | None = None) -> tuple[np.ndarray, ServerStats]:
    """Run a :class:`ParameterServer` on this rank; returns (final parameters, stats).

    Sharded (``config.num_servers`` > 1): every server rank returns the whole final vector
    (the servers exchange their shards at the end) and the stats of its own shard.
    """
    server = ParameterServer(group, initial, config, timeout=timeout)
    params = await server.serve()
    if config.num_servers > 1:
        params = await server.assemble(params)
    return params, server.stats
