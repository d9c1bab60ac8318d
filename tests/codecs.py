"""Compressors the tests register by name (importing this module registers them, in every rank)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import sparsecoll
from sparsecoll.compress import TopKCodec


@dataclass(frozen=True)
class SignPayload:
    """Signs packed 8 to a byte and one scale: 1 bit a value."""

    signs: np.ndarray
    scale: np.ndarray
    size: int


@sparsecoll.register_compressor("test-sign", replace=True)
class SignCodec:
    """signSGD with a mean-magnitude scale (Bernstein et al.): biased, so error feedback matters."""

    def encode(self, array: np.ndarray) -> SignPayload:
        return SignPayload(np.packbits(array >= 0), np.array(np.abs(array).mean(), np.float32), array.size)

    def decode(self, payload: SignPayload) -> np.ndarray:
        if payload.signs.size != (payload.size + 7) // 8:
            raise ValueError(f"{payload.signs.size} sign bytes for {payload.size} values")
        signs = np.unpackbits(payload.signs)[:payload.size]
        return np.where(signs == 1, payload.scale, -payload.scale).astype(np.float32)


@sparsecoll.register_compressor("test-bad-indices", replace=True)
class BadIndexCodec(TopKCodec):
    """Top-k whose rank 1 sends an index past the end (a corrupt or hostile peer)."""

    def __init__(self, density: float, rank: int = 0) -> None:
        super().__init__(density)
        self.rank = rank

    def encode(self, array):
        payload = super().encode(array)
        if self.rank == 1:
            payload.indices[-1] = array.size + 5
        return payload
