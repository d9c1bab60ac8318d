"""Any registered compressor as a collective: encode, allgather the payloads, decode, sum.

This is how a codec registered with :func:`sparsecoll.register_compressor` becomes usable by
name wherever an algorithm is named (``reduce_gradient``, ``SparseCollOptimizer``,
``sparsecoll-bench``), the way GRACE pairs a compressor with an allgather communicator:

1. every rank encodes its gradient with its own instance of the codec;
2. the payloads travel around a ring (allgatherv: each rank's payload may differ in size);
3. every rank decodes each payload and sums them in rank order, so all ranks hold the same
   bit-identical dense sum.

A payload is the codec's own object; only its arrays travel. It may be an array, a tuple of
arrays, or a dataclass (as :class:`~sparsecoll.compress.SparsePayload`) whose array fields
travel and whose other fields (sizes, bit widths, dtypes) must be the same on every rank,
since the receiver takes them from its own payload. Array dtypes come from the receiver's own
payload too; lengths come from the frame. Nothing is unpickled. Sparse payloads (fields
``indices`` and ``values``) have their indices checked before decoding; other codecs must
check what they decode (a ``decode`` that raises ``ValueError`` fails the call on every rank).
"""

from __future__ import annotations

import dataclasses
import inspect
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np

from sparsecoll.call import Call, CollectiveResult
from sparsecoll.collectives.sparse_common import SparseResult, float_vector, ring_gather_blocks
from sparsecoll.errors import FrameError, InvalidArgumentError
from sparsecoll.wire import Algorithm, Op, ReduceOp, Signature, dtype_code

if TYPE_CHECKING:
    from sparsecoll.group import Group

SIZE_SLACK = 1 << 20
"""Bytes a peer's payload may exceed four times the dense gradient (index arrays, scales)."""


def payload_arrays(payload: Any) -> list[np.ndarray]:
    """The arrays of a payload that travel, in a fixed order."""
    if isinstance(payload, np.ndarray):
        return [payload]
    if isinstance(payload, (tuple, list)):
        return [np.asarray(part) for part in payload]
    if dataclasses.is_dataclass(payload):
        return [value for value in _array_fields(payload).values()]
    raise InvalidArgumentError(f"a codec payload must be an array, a tuple of arrays or a dataclass "
                               f"with array fields, not {type(payload).__name__}")


def rebuild_payload(template: Any, arrays: list[np.ndarray]) -> Any:
    """A payload like ``template`` (this rank's) holding a peer's ``arrays``."""
    if isinstance(template, np.ndarray):
        return arrays[0]
    if isinstance(template, (tuple, list)):
        return type(template)(arrays)
    return dataclasses.replace(template, **dict(zip(_array_fields(template), arrays, strict=True)))


def _array_fields(payload: Any) -> dict[str, np.ndarray]:
    return {field.name: getattr(payload, field.name) for field in dataclasses.fields(payload)
            if isinstance(getattr(payload, field.name), np.ndarray)}


def _block(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Wire form: a table of byte lengths, then each array's bytes."""
    contiguous = [np.ascontiguousarray(array) for array in arrays]
    lengths = np.array([array.nbytes for array in contiguous], "<u8")
    return [lengths, *[array.reshape(-1).view(np.uint8) for array in contiguous]]


def _split(block: Any, templates: list[np.ndarray], rank: int) -> list[np.ndarray]:
    """A peer's arrays from its block, shaped and typed like this rank's ``templates``."""
    data = np.frombuffer(block, np.uint8)
    table = 8 * len(templates)
    if data.size < table:
        raise FrameError(f"compressed payload of {data.size} bytes has no length table", rank=rank)
    lengths = data[:table].view("<u8").astype(np.int64)
    if int(lengths.sum()) != data.size - table:
        raise FrameError(f"compressed payload lengths add up to {int(lengths.sum())}, the frame "
                         f"holds {data.size - table}", rank=rank)
    arrays, offset = [], table
    for length, template in zip(lengths, templates, strict=True):
        row = max(1, int(np.prod(template.shape[1:], dtype=np.int64))) * template.itemsize
        if length % row:
            raise FrameError(f"a compressed payload array of {length} bytes is not whole rows of "
                             f"{template.dtype} {template.shape[1:]}", rank=rank)
        part = data[offset:offset + length].view(template.dtype)
        if template.ndim == 0 and part.size != 1:
            raise FrameError(f"a compressed payload scalar arrived as {part.size} values", rank=rank)
        arrays.append(part.reshape(-1, *template.shape[1:]) if template.ndim else part.reshape(()))
        offset += length
    return arrays


def _sparse_arrays(payload: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """A sparse payload's (indices, values): both attributes present and numpy arrays; else None."""
    indices = getattr(payload, "indices", None)
    values = getattr(payload, "values", None)
    if isinstance(indices, np.ndarray) and isinstance(values, np.ndarray):
        return indices, values
    return None


def _check_sparse(payload: Any, size: int, rank: int, source: int) -> None:
    sparse = _sparse_arrays(payload)
    if sparse is None:
        return
    indices, values = sparse
    if indices.size != values.size or (indices.size and (int(indices.min()) < 0 or int(indices.max()) >= size)):
        raise FrameError(f"rank {source} sent a sparse payload with indices outside [0, {size}) or "
                         f"{indices.size} indices for {values.size} values", rank=rank, peer=source)


def make_codec(factory: Any, density: float | None, k: int | None, seed: int, options: dict) -> Any:
    """A codec from its factory, given the density (or k) and seed when the factory takes them."""
    accepted = inspect.signature(factory).parameters
    offered = {"density": density, "k": k, "seed": seed}
    chosen = {name: value for name, value in offered.items() if value is not None and name in accepted}
    return factory(**chosen, **options)


def _encode(codec: Any, flat: np.ndarray, step: int) -> Any:
    takes_step = "step" in inspect.signature(codec.encode).parameters
    return codec.encode(flat, step=step) if takes_step else codec.encode(flat)


async def compressed_allgather(group: Group, grad: np.ndarray, codec: Any, *, name: str, step: int = 0,
                               timeout: float | None = None) -> CollectiveResult:
    """The sum over ranks of ``codec.decode(codec.encode(grad))``; value is a dense SparseResult.

    ``name`` (the compressor's registered name) is part of the call's signature, so ranks that
    picked different compressors raise CollectiveMismatchError instead of decoding garbage.
    The result's ``sent_values`` is this rank's decoded contribution (or, for a sparse payload,
    its indices and values), so error feedback keeps exactly what the codec lost.
    """
    flat = float_vector(grad)
    size = flat.size
    signature = Signature(Op.CUSTOM, Algorithm.RING, dtype_code(flat.dtype), ReduceOp.SUM, -1, size, 0,
                          zlib.crc32(f"compressed:{name}".encode()))
    limit = 4 * flat.nbytes + SIZE_SLACK

    async def body(call: Call) -> SparseResult:
        payload = _encode(codec, flat, step)  # inside the call: a failing encode fails every rank
        templates = payload_arrays(payload)
        blocks = (await ring_gather_blocks(call, _block(templates), limit) if call.size > 1
                  else [None])
        total = np.zeros(size, flat.dtype)
        mine = None
        for source, block in enumerate(blocks):
            received = payload if source == call.rank else rebuild_payload(
                payload, _split(block, templates, call.rank))
            _check_sparse(received, size, call.rank, source)
            try:
                decoded = np.asarray(codec.decode(received), flat.dtype).reshape(-1)
            except (ValueError, IndexError) as error:
                raise FrameError(f"compressor {name!r} could not decode rank {source}'s payload: {error}",
                                 rank=call.rank, peer=source) from None
            if decoded.size != size:
                raise FrameError(f"compressor {name!r} decoded {decoded.size} values, expected {size}",
                                 rank=call.rank, peer=source)
            total += decoded
            if source == call.rank:
                mine = decoded
        sparse = _sparse_arrays(payload)
        if sparse is not None:
            indices, values = sparse
            return SparseResult(None, total, size, np.asarray(indices, np.int64), values)
        return SparseResult(None, total, size, None, mine)

    return await group.run(signature, body, timeout)
