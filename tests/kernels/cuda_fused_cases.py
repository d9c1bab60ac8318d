"""The fused pass's CUDA kernel against its CPU kernel, bit for bit.

Not collected by a plain ``pytest``: ``test_cuda.py`` runs this file in a subprocess
under Numba's CUDA simulator (and on a GPU where one is present), with the other kernels'
cases. The simulator runs every thread in Python, so the buffers stay small.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

from sparsecoll.kernels import _fused_cuda, fused
from tests.kernels.fused_reference import BF16

if not cuda.is_available():
    pytest.skip("neither a CUDA device nor the simulator is available", allow_module_level=True)

SIZE = 128
SPLIT = 40
_fused_cuda.MAX_BLOCKS = 1  # fewer threads than elements: every thread walks the grid-stride loop
DTYPES = {"float32": (np.float32, np.float32), "float64": (np.float64, np.float64), "bfloat16": (BF16, BF16),
          "bfloat16-wide": (BF16, np.float32)}


SETTINGS = [(0.0, False, 0.0, 1.0), (0.9, False, 0.01, 0.5), (0.9, True, 0.01, 1.0)]
"""(momentum, nesterov, weight decay, beta): each term of the element code, in three cases."""


@pytest.mark.parametrize("momentum,nesterov,weight_decay,beta", SETTINGS)
@pytest.mark.parametrize("dtypes", DTYPES)
def test_cuda_pass_equals_cpu_pass(dtypes: str, momentum: float, nesterov: bool, weight_decay: float,
                                   beta: float) -> None:
    grad_dtype, state_dtype = DTYPES[dtypes]
    rng = np.random.default_rng(7)
    grad, param = (rng.standard_normal(SIZE).astype(grad_dtype) for _ in range(2))
    residual, velocity = (rng.standard_normal(SIZE).astype(state_dtype) for _ in range(2))
    send_to_grad = beta < 1.0 or grad.dtype != residual.dtype
    options = {"scale": 0.75, "weight_decay": weight_decay, "momentum_factor": momentum, "nesterov": nesterov,
               "beta": beta, "send_to_grad": send_to_grad, "zero_grad": not send_to_grad}
    host = [grad.copy(), residual.copy(), velocity.copy() if momentum else None]
    fused.accumulate_select(*host, segments=[(0, param[:SPLIT]), (SPLIT, param[SPLIT:])], **options)
    device = [None if array is None else cuda.to_device(array.copy()) for array in (grad, residual, velocity)]
    if not momentum:
        device[2] = None
    on_device = fused.accumulate_select(*device, segments=[(0, cuda.to_device(param[:SPLIT])),
                                                           (SPLIT, cuda.to_device(param[SPLIT:]))], k=5, **options)
    assert on_device is None  # the device path leaves selection to the collective
    for expected, actual in zip(host, device):
        if expected is not None:
            np.testing.assert_array_equal(actual.copy_to_host().view(np.uint8), expected.view(np.uint8))
