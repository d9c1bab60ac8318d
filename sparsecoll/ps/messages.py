"""The parameter server's messages as flat uint8 arrays: two int64 (kind, version), then values.

Only arrays travel (no pickle): a parameter message is float32 values or a quantized payload
(packed codes, then float32 block scales); a push is that for the gradient, preceded by uint32
indices when it is sparse. A decoder checks every length against the model size the receiver
already knows before it reads a value, so a malformed message raises ``FrameError``.
"""

from __future__ import annotations

import enum

import numpy as np

from sparsecoll.compress import QuantizedPayload, QuantizeCodec
from sparsecoll.errors import FrameError

from .config import FULL_PRECISION, MESSAGE_HEADER_BYTES, AsyLPGConfig

REQUEST_TAG = 0x50530001
"""p2p tag of every worker-to-server message (so one ANY_SOURCE receive sees them in order)."""
REPLY_TAG = 0x50530002
"""p2p tag of the server's parameter messages."""


class Kind(enum.IntEnum):
    """What a ps message is."""

    PULL = 1        # worker asks for the parameters
    PUSH = 2        # worker sends a gradient computed at the version it names
    DONE = 3        # worker leaves; the server stops when every worker has left
    PARAMS = 4      # server's parameters; the reply to a pull or an accepted push
    REFUSED = 5     # server's parameters; the push was too stale and was dropped


def frame(kind: Kind, version: int, parts: list[np.ndarray]) -> np.ndarray:
    """One message: the header, then the raw bytes of each part."""
    header = np.array([int(kind), version], np.int64).view(np.uint8)
    return np.concatenate([header] + [np.ascontiguousarray(part).reshape(-1).view(np.uint8) for part in parts])


def parse(message: np.ndarray, peer: int, rank: int) -> tuple[Kind, int, np.ndarray]:
    """(kind, version, body) of a message; FrameError for a short one or an unknown kind."""
    raw = np.asarray(message).view(np.uint8)
    if raw.size < MESSAGE_HEADER_BYTES:
        raise FrameError(f"ps message of {raw.size} bytes is shorter than its header", rank=rank, peer=peer)
    kind_code, version = (int(v) for v in raw[:MESSAGE_HEADER_BYTES].view(np.int64))
    if kind_code not in Kind._value2member_map_:
        raise FrameError(f"unknown ps message kind {kind_code}", rank=rank, peer=peer)
    return Kind(kind_code), version, raw[MESSAGE_HEADER_BYTES:]


def encode_values(values: np.ndarray, bits: int, codec: QuantizeCodec | None, step: int) -> list[np.ndarray]:
    """float32 values, or the packed codes and scales of their ``bits``-bit stochastic rounding."""
    if bits == FULL_PRECISION:
        return [np.asarray(values, np.float32)]
    payload = codec.encode(np.asarray(values, np.float64), step=step)
    return [payload.packed, np.asarray(payload.scales, np.float32)]


def decode_values(body: np.ndarray, count: int, bits: int, codec: QuantizeCodec | None,
                  config: AsyLPGConfig, peer: int, rank: int) -> np.ndarray:
    """The float64 values of a body that ``encode_values`` wrote for ``count`` values."""
    expected = config.values_bytes(count, bits)
    if body.size != expected:
        raise FrameError(f"ps values of {body.size} bytes, expected {expected} for {count} values "
                         f"at {bits} bits", rank=rank, peer=peer)
    if bits == FULL_PRECISION:
        return body.view(np.float32).astype(np.float64)
    packed_bytes = expected - 4 * -(-count // config.block_size)
    payload = QuantizedPayload(body[:packed_bytes], body[packed_bytes:].view(np.float32), bits,
                               config.block_size, count, np.dtype(np.float64))
    return codec.decode(payload)


def split_indices(body: np.ndarray, count: int, size: int, peer: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, rest) of a sparse push body; FrameError for an index outside the model."""
    if body.size < 4 * count:
        raise FrameError(f"sparse push of {body.size} bytes cannot hold {count} indices", rank=rank, peer=peer)
    indices = body[:4 * count].view(np.uint32)
    if count and int(indices.max()) >= size:
        raise FrameError(f"sparse push names index {int(indices.max())} of a {size}-parameter model",
                         rank=rank, peer=peer)
    return indices.astype(np.int64), body[4 * count:]
