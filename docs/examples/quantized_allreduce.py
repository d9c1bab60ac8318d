"""A custom collective: allreduce of 8-bit stochastically rounded values, registered by name.

Each rank quantizes its array to one byte a value plus a float32 scale per block, everyone
allgathers those bytes (about a quarter of the float32 bytes), and each rank decodes every
rank's contribution and sums. Run it: ``python docs/examples/quantized_allreduce.py``.
"""

import numpy as np

import sparsecoll
from sparsecoll.kernels import dequantize, quantize

BITS, BLOCK = 8, 256  # one byte a value; one float32 scale (max |x|) per 256 values


@sparsecoll.register_collective("quantized-allreduce")
async def quantized_allreduce(group: sparsecoll.Group, array: np.ndarray, *, step: int = 0,
                              timeout: float | None = None) -> sparsecoll.CollectiveResult:
    """Sum of every rank's float array, each carried as 8-bit codes and per-block scales."""
    flat = np.ascontiguousarray(array, np.float32).reshape(-1)
    # a different random stream per rank and step keeps the rounding errors independent
    packed, scales = quantize(flat, BITS, block_size=BLOCK, seed=step * group.size + group.rank)
    message = np.concatenate([scales.view(np.uint8), packed])  # one frame: scales, then codes
    gathered, stats = await group.allgather(message, timeout=timeout)
    total = np.zeros(flat.size, np.float32)
    for row in gathered:
        row_scales = row[:scales.nbytes].view(np.float32)
        total += dequantize(row[scales.nbytes:], row_scales, BITS, flat.size, block_size=BLOCK)
    return sparsecoll.CollectiveResult(total.reshape(array.shape), stats)


def gradient(rank: int, size: int = 1 << 16) -> np.ndarray:
    """A stand-in gradient for ``rank``."""
    return np.random.default_rng(rank).normal(size=size).astype(np.float32)


async def main(group: sparsecoll.Group) -> tuple[np.ndarray, int, int]:
    """The quantized sum by name, and the bytes it sent beside a float32 allgather's."""
    grad = gradient(group.rank)
    total, stats = await group.collective("quantized-allreduce", grad)
    _, float32_stats = await group.allgather(grad)
    return total, stats.bytes_sent, float32_stats.bytes_sent


if __name__ == "__main__":
    from sparsecoll.launch import spawn

    for rank, (total, sent, float32_sent) in enumerate(spawn(4, main, group_kwargs={})):
        print(f"rank {rank}: {total[:3]}... {sent} bytes sent, {float32_sent} for float32")
