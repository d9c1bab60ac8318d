"""Named compressors and collectives: registered once, then used by name."""

from __future__ import annotations

import numpy as np
import pytest

import sparsecoll
from sparsecoll import registry
from sparsecoll.errors import InvalidArgumentError
from tests.ranks import run_ranks


class SignCodec:
    """1-bit sign compression with one scale: the smallest useful custom compressor."""

    def __init__(self, scale_by: str = "mean") -> None:
        self.scale_by = scale_by

    def encode(self, array: np.ndarray) -> tuple[np.ndarray, np.float32]:
        return np.packbits(array >= 0), np.float32(np.abs(array).mean())

    def decode(self, payload: tuple[np.ndarray, np.float32], size: int) -> np.ndarray:
        bits, scale = payload
        return np.where(np.unpackbits(bits)[:size] == 1, scale, -scale).astype(np.float32)


def test_compressors_register_and_resolve_by_name() -> None:
    registry.register_compressor("sign-test", SignCodec, replace=True)
    codec = registry.compressor("sign-test", scale_by="mean")
    data = np.array([1.0, -3.0, 2.0], np.float32)
    assert codec.decode(codec.encode(data), 3).tolist() == [2.0, -2.0, 2.0]
    assert "sign-test" in registry.compressors() and "topk" in registry.compressors()
    assert type(registry.compressor("topk", density=0.5)).__name__ == "TopKCodec"
    with pytest.raises(InvalidArgumentError, match="already registered"):
        registry.register_compressor("sign-test", SignCodec)
    with pytest.raises(InvalidArgumentError, match="no compressor named"):
        registry.compressor("nope")


@sparsecoll.register_collective("sign-allreduce", replace=True)
async def sign_allreduce(group, array, **options):
    """A custom collective on the public API: gather everyone's signs, sum the decoded."""
    codec = SignCodec()
    bits, scale = codec.encode(array)
    gathered_bits, stats = await group.allgather(bits)
    scales, _ = await group.allgather(np.array([scale], np.float32))
    total = sum(codec.decode((gathered_bits[r], scales[r, 0]), array.size) for r in range(group.size))
    return sparsecoll.CollectiveResult(total, stats)


async def use_by_name(group) -> list[float]:
    value, stats = await group.collective("sign-allreduce", np.array([1.0, -1.0], np.float32) * (group.rank + 1))
    dense, _ = await group.collective("dense", np.ones(2, np.float32))
    return value.tolist() + dense.tolist() + [stats.bytes_sent]


def test_collectives_register_and_run_by_name() -> None:
    for result in run_ranks(2, use_by_name, timeout=60):
        assert result[:4] == [3.0, -3.0, 2.0, 2.0]
        assert result[4] > 0
    assert "sign-allreduce" in registry.collectives()
    with pytest.raises(InvalidArgumentError):
        registry.collective("missing")
