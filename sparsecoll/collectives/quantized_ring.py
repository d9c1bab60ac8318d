"""Ring allreduce with values at b bits (QSGD-style), shared by dense, CLT-k and sketch.

Reduce-scatter: each hop sends its partial sum of one chunk stochastically rounded to b bits
(a float32 scale per ``QUANT_BLOCK`` values, then the packed codes); the receiver dequantizes
and adds in the vector's dtype, and its next send rounds that new partial sum afresh. Every
rounding is unbiased given what it rounds, so the sum is unbiased. Allgather: the owner of a
reduced chunk rounds it once and keeps the decoded values, and those same bytes go around the
ring, so every rank decodes identical bytes and all hold the same result, bit for bit.
Per rank: 2(P-1) chunks of d/P values at b bits plus 4 bytes per block, about
(b/32 + 1/256) of the float32 ring's bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np

from sparsecoll import kernels
from sparsecoll.call import Call, CollectiveResult
from sparsecoll.collectives.dense import SEGMENT_BYTES, _segments, chunk_bounds, ring_allreduce
from sparsecoll.collectives.sparse_common import float_vector
from sparsecoll.errors import FrameError
from sparsecoll.kernels.quantize import check_layout
from sparsecoll.wire import QUANT_BLOCK, Algorithm, Op, ReduceOp, Signature, dtype_code, packed_bytes

if TYPE_CHECKING:
    from sparsecoll.group import Group

Piece = list[np.ndarray] | list[memoryview]


def check_bits(bits: int) -> None:
    """InvalidArgumentError unless values can be packed at ``bits`` bits."""
    check_layout(bits, QUANT_BLOCK)


def quantized_bytes(count: int, bits: int) -> int:
    """Wire bytes of ``count`` values at ``bits`` bits: block scales, then packed codes."""
    return 4 * (-(-count // QUANT_BLOCK)) + packed_bytes(count, bits)


def stream_seed(*parts: int) -> int:
    """A 64-bit seed for one rounding, distinct for each (seed, call, rank, frame)."""
    words = np.array([part & 0xFFFFFFFFFFFFFFFF for part in parts], np.uint64)
    return int.from_bytes(hashlib.blake2b(words.tobytes(), digest_size=8).digest(), "little")


def _pieces(length: int, dtype: np.dtype) -> list[tuple[int, int]]:
    """Frames of whole quantization blocks, about ``SEGMENT_BYTES`` of unquantized values each."""
    return _segments(length, max(QUANT_BLOCK, SEGMENT_BYTES // dtype.itemsize // QUANT_BLOCK * QUANT_BLOCK))


def encode_quantized(values: np.ndarray, bits: int, seed: int) -> list[np.ndarray]:
    """Wire buffers of ``values`` stochastically rounded to ``bits`` bits."""
    if values.size == 0:
        return [np.empty(0, np.uint8)]
    packed, scales = kernels.quantize(values, bits, block_size=QUANT_BLOCK, seed=seed)
    return [scales, packed]


def decode_quantized(payload: memoryview | list[np.ndarray], count: int, bits: int,
                     dtype: np.dtype) -> np.ndarray:
    """The ``count`` values a received frame (or this rank's own buffers) encodes."""
    if count == 0:
        return np.empty(0, dtype)
    if isinstance(payload, list):
        scales, packed = payload
    else:
        if len(payload) != quantized_bytes(count, bits):
            raise FrameError(f"quantized frame of {len(payload)} bytes does not hold {count} values "
                             f"at {bits} bits")
        blocks = -(-count // QUANT_BLOCK)
        scales = np.frombuffer(payload, np.float32, blocks)
        packed = np.frombuffer(payload, np.uint8, packed_bytes(count, bits), 4 * blocks)
    return kernels.dequantize(packed, scales, bits, count, block_size=QUANT_BLOCK, dtype=dtype)


async def _hop(call: Call, outgoing: Iterable[Piece], incoming: list[tuple[int, int]], tag: int,
               bits: int, on_piece: Callable[[int, memoryview], None]) -> None:
    """Send pieces to the right neighbour while pieces from the left arrive and are handled."""
    size = call.size
    right, left = (call.rank + 1) % size, (call.rank - 1) % size
    posted = [call.post(left, tag + index, limit=quantized_bytes(stop - start, bits))
              for index, (start, stop) in enumerate(incoming)]

    async def send_all() -> None:
        for index, buffers in enumerate(outgoing):
            await call.send(right, tag + index, *buffers)

    sender = asyncio.ensure_future(send_all())
    try:
        for index, received in enumerate(posted):
            on_piece(index, await call.wait(received))
        await sender
    finally:
        if not sender.done():
            sender.cancel()
        for received in posted:
            if not received.done:
                await call.transport.mailbox.release(received)  # out is ours again only once nothing writes it


async def quantized_ring_allreduce(call: Call, flat: np.ndarray, bits: int, seed: int = 0,
                                   tag_base: int = 0) -> None:
    """Sum ``flat`` over the ranks in place, every transfer at ``bits`` bits (see module doc)."""
    size, rank = call.size, call.rank
    if size == 1:
        return
    bounds = chunk_bounds(flat.size, size)
    pieces = [_pieces(bounds[index + 1] - bounds[index], flat.dtype) for index in range(size)]
    stride = len(pieces[0])

    def chunk(index: int) -> np.ndarray:
        return flat[bounds[index]:bounds[index + 1]]

    def rounded(index: int, tag: int) -> Iterable[Piece]:
        # encoded one piece at a time, as the sender gets to it
        data = chunk(index)
        for number, (start, stop) in enumerate(pieces[index]):
            yield encode_quantized(data[start:stop], bits, stream_seed(seed, call.seq, rank, tag + number))

    def add_into(index: int) -> Callable[[int, memoryview], None]:
        data = chunk(index)

        def add(number: int, payload: memoryview) -> None:
            start, stop = pieces[index][number]
            data[start:stop] += decode_quantized(payload, stop - start, bits, flat.dtype)
        return add

    for step in range(size - 1):
        tag = tag_base + step * stride
        target = (rank - step - 1) % size
        await _hop(call, rounded((rank - step) % size, tag), pieces[target], tag, bits, add_into(target))

    owned = (rank + 1) % size
    wire: dict[int, list[Piece]] = {owned: []}
    tag = tag_base + (size - 1) * stride
    data = chunk(owned)
    for start, stop in pieces[owned]:
        piece_seed = stream_seed(seed, call.seq, rank, tag + len(wire[owned]))
        encoded = encode_quantized(data[start:stop], bits, piece_seed)
        data[start:stop] = decode_quantized(encoded, stop - start, bits, flat.dtype)
        wire[owned].append(encoded)

    def keep(index: int) -> Callable[[int, memoryview], None]:
        data = chunk(index)
        wire[index] = []

        def store(number: int, payload: memoryview) -> None:
            start, stop = pieces[index][number]
            data[start:stop] = decode_quantized(payload, stop - start, bits, flat.dtype)
            wire[index].append([payload])
        return store

    for step in range(size - 1):
        tag = tag_base + (size - 1 + step) * stride
        target = (rank - step) % size
        await _hop(call, wire[(rank - step + 1) % size], pieces[target], tag, bits, keep(target))
    call.stats.rounds += 2 * (size - 1)


async def ring_sum(call: Call, flat: np.ndarray, bits: int | None, seed: int, tag_base: int = 0) -> None:
    """Sum ``flat`` in place over the ring: at ``bits`` bits when given, else exactly."""
    if bits:
        await quantized_ring_allreduce(call, flat, bits, seed, tag_base)
    elif call.size > 1:
        await ring_allreduce(call, flat, np.add, tag_base=tag_base)


async def quantized_allreduce(group: Group, array: np.ndarray, bits: int, *, seed: int = 0,
                              timeout: float | None = None) -> CollectiveResult:
    """Sum of a float array over the ranks, sent at ``bits`` bits a value (QSGD-style ring).

    The value is a new flat array, identical on every rank and an unbiased estimate of the sum.
    """
    check_bits(bits)
    flat = float_vector(array)
    result = flat.copy()
    signature = Signature(Op.QUANTIZED_ALLREDUCE, Algorithm.RING, dtype_code(flat.dtype), ReduceOp.SUM,
                          -1, flat.size, 0, bits)

    async def body(call: Call) -> np.ndarray:
        await quantized_ring_allreduce(call, result, bits, seed)
        return result

    return await group.run(signature, body, timeout)
