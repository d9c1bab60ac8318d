"""The settings of double quantization (AsyLPG) and the bytes each message carries.

One :class:`AsyLPGConfig` is shared by the server and every worker (each builds it from the
same arguments); ``bits=32`` on either side means full precision, so the same code runs the
baseline. The byte formulas here are the wire's, and tests hold the counters to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsecoll.compress import k_for_density
from sparsecoll.errors import InvalidArgumentError
from sparsecoll.kernels.quantize import check_layout, packed_size

FULL_PRECISION = 32
"""``param_bits`` / ``grad_bits`` value that sends float32 values unquantized."""
PARAMETER_ENCODINGS = ("delta", "direct")
MESSAGE_HEADER_BYTES = 16
"""Every ps message starts with two int64: its kind and a parameter version."""
SHARD_SEED_STRIDE = 104_729
"""Seed offset between shards, so two shards' roundings are independent (shard 0 keeps the unsharded seeds)."""


@dataclass(frozen=True)
class AsyLPGConfig:
    """Hyperparameters of asynchronous double quantization (Yu, Wu & Huang, NeurIPS 2019).

    ``param_bits`` / ``grad_bits``: 8, 4, 2, 1, or 32 (full precision) for the pulled parameters
    and the pushed gradients. ``density`` < 1 sends only the top ``density`` fraction of the
    gradient (with error feedback on the worker) before quantizing it: Sparse-AsyLPG.
    ``momentum`` > 0 makes the server's step Nesterov-accelerated: accelerated AsyLPG.
    ``staleness``: the server refuses a gradient computed at a version more than this many
    updates old (the paper's delay bound τ). ``param_encoding``: ``"delta"`` quantizes the
    change since the worker's last pull (its copy's error shrinks with the step), ``"direct"``
    quantizes the parameters themselves (the paper's Q(x) on a per-block grid).
    ``num_servers`` > 1 shards the parameters: ranks 0 .. num_servers - 1 each serve one
    contiguous shard (:func:`shard_bounds`) as a server of its own (own version, own staleness
    bound), and every worker pulls and pushes every shard concurrently.
    """

    lr: float
    param_bits: int = 8
    grad_bits: int = 8
    density: float = 1.0
    momentum: float = 0.0
    staleness: int = 16
    param_encoding: str = "delta"
    block_size: int = 256
    seed: int = 0
    num_servers: int = 1

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise InvalidArgumentError(f"lr must be positive, not {self.lr}")
        for name in ("param_bits", "grad_bits"):
            bits = getattr(self, name)
            if bits != FULL_PRECISION:
                check_layout(bits, self.block_size)
        k_for_density(1, self.density)
        if not 0.0 <= self.momentum < 1.0:
            raise InvalidArgumentError(f"momentum must be in [0, 1), not {self.momentum}")
        if self.staleness < 0:
            raise InvalidArgumentError(f"staleness must be >= 0, not {self.staleness}")
        if isinstance(self.num_servers, bool) or not isinstance(self.num_servers, int) or self.num_servers < 1:
            raise InvalidArgumentError(f"num_servers must be an int >= 1, not {self.num_servers!r}")
        if self.param_encoding not in PARAMETER_ENCODINGS:
            raise InvalidArgumentError(f"param_encoding must be one of {PARAMETER_ENCODINGS}, "
                                       f"not {self.param_encoding!r}")

    @property
    def sparse(self) -> bool:
        """Whether pushes carry top-k (index, value) pairs (Sparse-AsyLPG)."""
        return self.density < 1.0

    def pushed_count(self, size: int) -> int:
        """Values a push carries for a model of ``size`` parameters."""
        return k_for_density(size, self.density) if self.sparse else size

    def values_bytes(self, count: int, bits: int) -> int:
        """Bytes of ``count`` values at ``bits``: float32, or packed codes plus float32 block scales."""
        if bits == FULL_PRECISION:
            return 4 * count
        return packed_size(count, bits) + 4 * -(-count // self.block_size)

    def pull_bytes(self, size: int) -> int:
        """Payload bytes of one parameter message (a reply to a pull or a push)."""
        return MESSAGE_HEADER_BYTES + self.values_bytes(size, self.param_bits)

    def push_bytes(self, size: int) -> int:
        """Payload bytes of one gradient push: uint32 indices when sparse, then the values."""
        count = self.pushed_count(size)
        indices = 4 * count if self.sparse else 0
        return MESSAGE_HEADER_BYTES + indices + self.values_bytes(count, self.grad_bits)


def shard_bounds(size: int, num_servers: int) -> list[tuple[int, int]]:
    """[start, stop) of each server's contiguous shard of ``size`` parameters (sizes differ by at most 1).

    Every shard is quantized, sparsified and counted on its own: a message for a shard of ``n``
    parameters has ``pull_bytes(n)`` / ``push_bytes(n)`` bytes.
    """
    if size < num_servers:
        raise InvalidArgumentError(f"{num_servers} servers cannot each hold a shard of a {size}-parameter model")
    base, extra = divmod(size, num_servers)
    stops = np.cumsum([base + (shard < extra) for shard in range(num_servers)])
    return [(int(stop - base - (shard < extra)), int(stop)) for shard, stop in enumerate(stops)]
