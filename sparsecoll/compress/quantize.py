"""Quantization codecs: stochastic b-bit values (QSGD-style) and double quantization of parameters.

``QuantizeCodec`` rounds any vector, dense gradients or the values of a sparse payload, to
b bits with a per-block scale; decode is unbiased. ``ParameterQuantizer`` is the parameter side of
double quantization (Yu et al., AsyLPG): the sender quantizes the change of the parameters since
the last message instead of the parameters themselves, and both sides advance a shared reference
by the decoded change, so their copies stay identical while the error stays a fraction of one
step's change.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sparsecoll.errors import InvalidArgumentError
from sparsecoll.kernels import dequantize, quantize
from sparsecoll.kernels.quantize import check_layout

from .payload import QuantizedPayload


class QuantizeCodec:
    """Stochastic rounding to ``bits`` in {8, 4, 2, 1} with a max-abs scale per ``block_size``."""

    def __init__(self, bits: int, *, block_size: int = 256, seed: int = 0) -> None:
        check_layout(bits, block_size)
        self.bits = bits
        self.block_size = block_size
        self.seed = seed

    def encode(self, array: Any, step: int = 0) -> QuantizedPayload:
        """Packed codes and scales of the flattened array; ``step`` picks fresh random draws."""
        stream = (self.seed * 0x9E3779B1 + step) & 0xFFFFFFFFFFFFFFFF
        packed, scales = quantize(array, self.bits, block_size=self.block_size, seed=stream)
        return QuantizedPayload(
            packed, scales, self.bits, self.block_size, int(array.size), np.dtype(array.dtype)
        )

    def decode(self, payload: QuantizedPayload) -> Any:
        """The (unbiased, noisy) values the payload encodes."""
        return dequantize(
            payload.packed,
            payload.scales,
            payload.bits,
            payload.size,
            block_size=payload.block_size,
            dtype=payload.dtype,
        )


class ParameterQuantizer:
    """One end of a quantized parameter stream; sender and receiver each hold one.

    ``encode`` (sender) quantizes ``params - reference``; ``decode`` (receiver) returns the
    updated parameters. Both advance ``reference`` by the decoded change, so they agree exactly.
    """

    def __init__(self, initial: np.ndarray, bits: int, *, block_size: int = 256, seed: int = 0) -> None:
        self.codec = QuantizeCodec(bits, block_size=block_size, seed=seed)
        self.reference = np.array(initial, dtype=np.float64).reshape(-1)
        self.step = 0

    def encode(self, params: np.ndarray) -> QuantizedPayload:
        """The quantized change of ``params`` since the last message."""
        flat = np.asarray(params, dtype=np.float64).reshape(-1)
        if flat.size != self.reference.size:
            raise InvalidArgumentError(f"{flat.size} parameters, expected {self.reference.size}")
        payload = self.codec.encode(flat - self.reference, step=self.step)
        self._advance(payload)
        return payload

    def decode(self, payload: QuantizedPayload) -> np.ndarray:
        """The receiver's new copy of the parameters."""
        if payload.size != self.reference.size:
            raise InvalidArgumentError(f"{payload.size} parameters, expected {self.reference.size}")
        self._advance(payload)
        return self.reference.copy()

    def _advance(self, payload: QuantizedPayload) -> None:
        self.reference += self.codec.decode(payload)
        self.step += 1
