"""Parameters broadcast at b bits (the parameter half of double quantization, Yu et al.).

The root sends the stochastically rounded *change* of the parameters since its last
broadcast; every rank keeps a :class:`~sparsecoll.compress.ParameterQuantizer` whose reference
advances by exactly the decoded change, so all ranks hold the same parameters, bit for bit,
and the rounding error of one step is carried into the next instead of accumulating.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sparsecoll.call import Call, CollectiveResult
from sparsecoll.collectives.dense import SMALL_BROADCAST_BYTES, binomial_broadcast, chain_broadcast
from sparsecoll.compress import ParameterQuantizer, QuantizedPayload
from sparsecoll.errors import InvalidArgumentError
from sparsecoll.wire import Algorithm, Op, Signature, dtype_code, packed_bytes

if TYPE_CHECKING:
    from sparsecoll.group import Group


async def broadcast_parameters(group: Group, params: np.ndarray, quantizer: ParameterQuantizer,
                               root: int = 0, *, timeout: float | None = None) -> CollectiveResult:
    """Root's ``params`` on every rank, sent as a ``quantizer.codec.bits``-bit change."""
    if not 0 <= root < group.size:
        raise InvalidArgumentError(f"root {root} is not a rank of a group of {group.size}", rank=group.rank)
    size = quantizer.reference.size
    bits, block = quantizer.codec.bits, quantizer.codec.block_size
    blocks = -(-size // block)
    message = np.empty(4 * blocks + packed_bytes(size, bits), np.uint8)
    if group.rank == root:
        payload = quantizer.encode(params)
        message[:4 * blocks] = np.asarray(payload.scales, np.float32).view(np.uint8)
        message[4 * blocks:] = payload.packed
    algorithm = Algorithm.BINOMIAL_TREE if message.nbytes <= SMALL_BROADCAST_BYTES else Algorithm.RING
    signature = Signature(Op.QUANTIZED_BROADCAST, algorithm, dtype_code(np.uint8), 0, root, size, bits,
                          block)

    async def body(call: Call) -> np.ndarray:
        if call.size > 1:
            if algorithm == Algorithm.BINOMIAL_TREE:
                await binomial_broadcast(call, message, root)
            else:
                await chain_broadcast(call, message, root)
        if call.rank == root:
            return quantizer.reference.copy()
        received = QuantizedPayload(message[4 * blocks:], message[:4 * blocks].view(np.float32), bits,
                                    block, size, np.dtype(np.float64))
        return quantizer.decode(received)

    return await group.run(signature, body, timeout)
