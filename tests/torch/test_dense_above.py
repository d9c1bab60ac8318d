"""``dense_above="auto"`` (the default): a warm-up step reduces dense where its sparse pairs would
send more bytes than the dense allreduce (allgather: density 1/P against float32, 1/(2P)
against ``dense_fp16``'s float16), at most 0.25, DGC's cut, which a float ``dense_above``
replaces. Four real ranks take one step at density 0.2 both ways."""

from __future__ import annotations

import pytest
import torch

from sparsecoll.collectives.cost_bytes import dense_bytes
from sparsecoll.torch import init_group
from sparsecoll.torch.error_feedback import ErrorFeedback
from sparsecoll.torch.exchange import AUTO_DENSE_ABOVE, Compression, reduce_buffer
from tests.ranks import run_ranks

SIZE, DENSITY = 40_000, 0.2


@pytest.mark.parametrize(("compression", "ranks", "cut"), [
    (Compression("allgather", 0.01), 4, 0.25),  # 1/P: DGC's cut already
    (Compression("allgather", 0.01), 8, 0.125),
    (Compression("allgather", 0.01), 32, 1 / 32),
    (Compression("allgather", 0.01, dense_fp16=True), 4, 0.125),
    (Compression("gtopk", 0.01), 4, AUTO_DENSE_ABOVE),  # its pairs cross log2 P links: capped
    (Compression("gtopk", 0.01, dense_fp16=True), 16, 0.117),
    (Compression("sketch", 0.01), 32, AUTO_DENSE_ABOVE),  # no byte formula: the cap
    (Compression("allgather", 0.01, dense_above=0.5), 32, 0.5),  # a number is kept as given
])
def test_the_cut_is_the_byte_break_even_at_most_a_quarter(compression: Compression, ranks: int, cut: float) -> None:
    compression.validate()
    assert compression.dense_cut(ranks, 1_200_000) == pytest.approx(cut, rel=0.01)


def test_quantized_pairs_break_even_later() -> None:
    plain = Compression("allgather", 0.01, dense_fp16=True).dense_cut(4, 1_200_000)
    assert Compression("allgather", 0.01, dense_fp16=True, quantize_bits=8).dense_cut(4, 1_200_000) > 1.5 * plain


def test_a_bfloat16_bucket_compares_with_its_own_dense_bytes() -> None:
    """dense_fp16 halves float32 buckets only: a 2-byte bucket's dense allreduce stays 2 bytes."""
    assert Compression("allgather", 0.01, dense_fp16=True).dense_cut(8, 1_200_000, itemsize=2) == pytest.approx(
        Compression("allgather", 0.01).dense_cut(8, 1_200_000, itemsize=2), rel=1e-9)


@pytest.mark.parametrize("value", ["fast", "0.3", -0.1, 0.0, 1.5])
def test_anything_else_is_refused(value) -> None:
    with pytest.raises(ValueError, match="dense_above"):
        Compression("allgather", 0.01, dense_above=value).validate()


def step_rank(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    outcome = {}
    with init_group(timeout=60, kernel_threads=1) as sync:
        for name, dense_above in (("auto", "auto"), ("quarter", 0.25)):
            gradient = torch.linspace(-1.0, 1.0, SIZE) * (rank + 1)
            memory = ErrorFeedback(gradient)
            compression = Compression("allgather", DENSITY, dense_fp16=True, dense_above=dense_above)
            stats = sync.run(reduce_buffer(sync.group, gradient, memory, compression, density=DENSITY, step=0,
                                           seed=0))
            outcome[name] = (stats.bytes_sent, memory.update_indices is None, int(torch.count_nonzero(gradient)))
    return outcome


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    return run_ranks(4, step_rank, timeout=120, group_kwargs=None)


def test_a_step_past_the_break_even_reduces_dense_in_float16(per_rank) -> None:
    for outcome in per_rank:
        _, auto_dense, auto_nonzero = outcome["auto"]
        _, quarter_dense, quarter_nonzero = outcome["quarter"]
        assert auto_dense and auto_nonzero == SIZE  # the float16 mean: every entry
        assert not quarter_dense and quarter_nonzero < SIZE  # 0.2 < 0.25: sparse pairs
    auto_total = sum(outcome["auto"][0] for outcome in per_rank)
    quarter_total = sum(outcome["quarter"][0] for outcome in per_rank)
    assert auto_total == pytest.approx(4 * dense_bytes(4, SIZE, 2), rel=1e-12)
    assert quarter_total > 1.4 * auto_total  # 0.2 of the values as 8-byte pairs over 3 links
