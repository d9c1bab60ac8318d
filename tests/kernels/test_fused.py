"""The fused error-feedback pass against its unfused numpy reference, bit for bit."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from numba.core.registry import CPUDispatcher

import sparsecoll.kernels as K
from sparsecoll.errors import InvalidArgumentError
from sparsecoll.kernels import fused
from tests.kernels.fused_reference import BF16, reference_step

SIZE = 70_001  # above select.FAST_MIN_SIZE, so the sampled candidate pass runs
DTYPES = {"float32": (np.float32, np.float32), "float64": (np.float64, np.float64), "bfloat16": (BF16, BF16),
          "bfloat16-wide": (BF16, np.float32)}
MOMENTUM = {"none": (0.0, False), "plain": (0.9, False), "nesterov": (0.9, True)}


def state(dtypes, momentum: bool, seed: int = 0, ties: bool = False):
    grad_dtype, state_dtype = dtypes
    rng = np.random.default_rng(seed)
    draw = (lambda: rng.integers(-4, 5, SIZE).astype(np.float64)) if ties else (lambda: rng.standard_normal(SIZE))
    return (draw().astype(grad_dtype), draw().astype(state_dtype),
            draw().astype(state_dtype) if momentum else None, draw().astype(grad_dtype))


def same_bits(actual: np.ndarray, expected: np.ndarray) -> bool:
    return actual.dtype == expected.dtype and np.array_equal(actual.view(np.uint8), expected.view(np.uint8))


@pytest.mark.parametrize("beta", [1.0, 0.3])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("momentum", MOMENTUM)
@pytest.mark.parametrize("dtypes", DTYPES)
def test_fused_pass_equals_unfused_reference(dtypes: str, momentum: str, weight_decay: float, beta: float) -> None:
    factor, nesterov = MOMENTUM[momentum]
    grad, residual, velocity, param = state(DTYPES[dtypes], bool(factor))
    send_to_grad = beta < 1.0 or grad.dtype != residual.dtype
    options = {"scale": 0.75, "weight_decay": weight_decay, "momentum_factor": factor, "nesterov": nesterov,
               "beta": beta, "send_to_grad": send_to_grad, "zero_grad": not send_to_grad}
    expected = reference_step(grad, residual, velocity, param, **options)
    segments = [(0, param[:1000]), (1000, param[1000:40_000]), (40_000, param[40_000:])]  # three parameters
    k = 70
    selection = fused.accumulate_select(grad, residual, velocity, segments=segments, k=k, seed=5, **options)
    assert same_bits(grad, expected[0]) and same_bits(residual, expected[1])
    if velocity is not None:
        assert same_bits(velocity, expected[2])
    sent = expected[0] if send_to_grad else expected[1]
    indices, values = K.topk_exact(sent, k)
    assert selection is not None
    np.testing.assert_array_equal(selection[0], indices)
    assert same_bits(selection[1], values)


@pytest.mark.parametrize("k", [0, 1, SIZE // 8 + 1, SIZE])
def test_dense_or_empty_selection_leaves_it_to_the_collective(k: int) -> None:
    grad, residual, velocity, _ = state(DTYPES["float32"], True)
    expected = reference_step(grad, residual, velocity, momentum_factor=0.9, zero_grad=True)
    selection = fused.accumulate_select(grad, residual, velocity, momentum_factor=0.9, zero_grad=True, k=k)
    assert same_bits(residual, expected[1]) and same_bits(velocity, expected[2]) and not grad.any()
    if k == 1:
        np.testing.assert_array_equal(selection[0], K.topk_exact(expected[1], 1)[0])
    else:  # k = 0, or denser than the sampled path takes: kernels.topk selects as before
        assert selection is None


def test_ties_overflowing_the_candidate_slots_still_select_exactly() -> None:
    grad, residual, _, _ = state(DTYPES["float32"], False, ties=True)
    expected = reference_step(grad, residual)
    for k in (50, 3000):
        grad_copy, residual_copy = grad.copy(), residual.copy()
        indices, values = fused.accumulate_select(grad_copy, residual_copy, k=k, seed=1)
        reference_indices, reference_values = K.topk_exact(expected[1], k)
        np.testing.assert_array_equal(indices, reference_indices)
        assert same_bits(values, reference_values)


def test_nonfinite_input_is_left_for_the_collective_to_report() -> None:
    grad, residual, _, _ = state(DTYPES["float32"], False)
    grad[123] = np.nan
    assert fused.accumulate_select(grad, residual, k=10) is None
    assert np.isnan(residual[123])


def test_bad_arguments_are_refused() -> None:
    grad, residual, velocity, param = state(DTYPES["float32"], True)
    with pytest.raises(InvalidArgumentError, match="segments"):
        fused.accumulate_select(grad, residual, weight_decay=0.1, segments=[(0, param[:10])])
    with pytest.raises(InvalidArgumentError, match="send_to_grad"):
        fused.accumulate_select(grad, residual, beta=0.5)
    with pytest.raises(InvalidArgumentError, match="float32, float64 or bfloat16"):
        fused.accumulate_select(grad.astype(np.float16), residual.astype(np.float16))
    with pytest.raises(InvalidArgumentError, match="same size"):
        fused.accumulate_select(grad, residual[:-1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, BF16])
def test_sum_squares_matches_numpy(dtype) -> None:
    values = np.random.default_rng(2).standard_normal(100_003).astype(dtype)
    expected = float(np.sum(values.astype(np.float64) ** 2))
    assert fused.sum_squares(values) == pytest.approx(expected, rel=1e-12)


def test_every_cpu_kernel_releases_the_gil() -> None:
    """nogil=True on every compiled CPU kernel, so that selection on the group's loop thread does
    not stall autograd's Python hooks (issue #21)."""
    import importlib
    import pkgutil

    holding = []
    for info in pkgutil.iter_modules(K.__path__):
        if "cuda" in info.name:
            continue
        module = importlib.import_module(f"sparsecoll.kernels.{info.name}")
        for name, value in inspect.getmembers(module, lambda member: isinstance(member, CPUDispatcher)):
            if value.__module__ == module.__name__ and not value.targetoptions.get("nogil"):
                holding.append(f"{module.__name__}.{name}")
    assert not holding, holding
