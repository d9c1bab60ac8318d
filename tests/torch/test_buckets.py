"""Bucketing: layout, adopted and copied gradients, views after a step, missing gradients,
refused gradient kinds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsecoll.torch.buckets import as_array, build_buckets, layout_signature


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def backward(net: torch.nn.Module) -> None:
    net(torch.randn(4, 6)).sum().backward()


def test_weights_compressed_biases_dense_in_order() -> None:
    net = model()
    buckets = build_buckets([{"params": list(net.parameters())}])
    assert [bucket.compressed for bucket in buckets] == [True, False]
    assert [bucket.size for bucket in buckets] == [6 * 5 + 5 * 3, 5 + 3]
    assert all(bucket.flat.dtype == torch.float32 for bucket in buckets)


def test_bucket_budget_splits_and_groups_stay_apart() -> None:
    net = model()
    weights = [net[0].weight, net[2].weight]
    buckets = build_buckets([{"params": weights[:1]}, {"params": weights[1:]}], dense_if=None)
    assert [bucket.group_index for bucket in buckets] == [0, 1]
    small = build_buckets([{"params": list(net.parameters())}], bucket_bytes=4 * 20, dense_if=None)
    assert sum(bucket.size for bucket in small) == sum(p.numel() for p in net.parameters())
    assert len(small) > 1
    with pytest.raises(ValueError, match="bucket_bytes"):
        build_buckets([{"params": weights}], bucket_bytes=0)


def test_gradients_become_views_of_the_bucket() -> None:
    net = model()
    buckets = build_buckets([{"params": list(net.parameters())}], dense_if=None)
    backward(net)
    expected = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    buckets[0].gather_grads()
    assert torch.equal(buckets[0].flat, expected)
    array = as_array(buckets[0].flat)
    assert np.shares_memory(array, buckets[0].flat.numpy())
    for position, param in enumerate(net.parameters()):
        assert param.grad.data_ptr() == buckets[0].slice(position).data_ptr()
    buckets[0].zero_grads()
    backward(net)  # autograd's own tensors: the bucket of several parameters copies them in
    before = buckets[0].flat.data_ptr()
    buckets[0].gather_grads()
    assert buckets[0].flat.data_ptr() == before
    assert not torch.equal(buckets[0].flat, torch.zeros_like(buckets[0].flat))
    assert all(p.grad.data_ptr() == buckets[0].slice(i).data_ptr() for i, p in enumerate(net.parameters()))


def test_a_one_parameter_bucket_reads_autograds_gradient_where_it_is() -> None:
    net = model()
    (bucket,) = build_buckets([{"params": [net[0].weight]}], dense_if=None)
    buffer = bucket.flat.data_ptr()
    backward(net)
    produced = net[0].weight.grad
    bucket.gather_grads()
    assert bucket.gradient.data_ptr() == produced.data_ptr() != buffer  # nothing copied
    assert bucket.flat.data_ptr() == buffer and not bucket.flat.any()  # the buffer waits for the result
    bucket.flat.fill_(3.0)
    bucket.scatter_grads()
    assert bucket.source is None and net[0].weight.grad.data_ptr() == buffer
    assert torch.all(net[0].weight.grad == 3.0)

    transposed = torch.randn(6, 5).t()  # not contiguous: copied into the buffer
    net[0].weight.grad = transposed
    bucket.gather_grads()
    assert bucket.source is None and bucket.gradient.data_ptr() == buffer
    assert torch.equal(bucket.slice(0), transposed) and net[0].weight.grad.data_ptr() == buffer


def test_missing_gradient_counts_as_zero() -> None:
    net = model()
    buckets = build_buckets([{"params": list(net.parameters())}], dense_if=None)
    buckets[0].flat.fill_(7.0)
    buckets[0].gather_grads()
    assert torch.count_nonzero(buckets[0].flat) == 0
    buckets[0].scatter_grads()
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())


def test_half_precision_parameters_keep_their_dtype_in_the_buffer() -> None:
    param = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    param.grad = torch.full((4, 4), 0.5, dtype=torch.bfloat16)
    (bucket,) = build_buckets([{"params": [param]}])
    assert bucket.flat.dtype == torch.bfloat16
    bucket.gather_grads()
    assert bucket.gradient.dtype == torch.bfloat16
    torch.mul(bucket.gradient, 2, out=bucket.flat)  # as a reduction writes its result
    bucket.scatter_grads()
    assert param.grad.dtype == torch.bfloat16 and torch.all(param.grad == 1)
    assert param.grad.data_ptr() == bucket.flat.data_ptr()  # a view: no copy per step


def test_sparse_and_complex_gradients_are_type_errors() -> None:
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    (bucket,) = build_buckets([{"params": list(embedding.parameters())}])
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="dense"):
        bucket.gather_grads()
    with pytest.raises(TypeError, match="complex"):
        build_buckets([{"params": [torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))]}])


def test_layout_signature_sees_count_shape_and_dtype() -> None:
    def signature(*shapes, dtype=torch.float32):
        params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in shapes]
        return layout_signature(build_buckets([{"params": params}]))

    base = signature((3, 4), (4,))
    assert np.array_equal(base, signature((3, 4), (4,)))
    assert base[0] == 2
    assert not np.array_equal(base, signature((4, 3), (4,)))
    assert not np.array_equal(base, signature((3, 4)))
    assert not np.array_equal(base, signature((3, 4), (4,), dtype=torch.float64))
