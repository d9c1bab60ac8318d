"""The tutorial's examples (docs/examples) run on real local ranks and do what the page says."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np

from tests.ranks import run_ranks

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


@functools.cache
def example(name: str) -> ModuleType:
    """Load docs/examples/<name>.py once per process (it may register a collective)."""
    spec = importlib.util.spec_from_file_location(f"sparsecoll_docs_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def parameter_server(group):
    return await example("parameter_server").main(group)


async def quantized_allreduce(group):
    return await example("quantized_allreduce").main(group)


def test_parameter_server_trains_to_the_least_squares_solution() -> None:
    ranks = 3
    params, *workers = run_ranks(ranks, parameter_server, timeout=60)
    shards = [example("parameter_server").shard(rank) for rank in range(1, ranks)]
    features = np.vstack([rows for rows, _ in shards])
    targets = np.concatenate([values for _, values in shards])
    solution = np.linalg.lstsq(features, targets, rcond=None)[0]
    assert np.linalg.norm(params - solution) < 1e-3 * np.linalg.norm(solution)
    for losses, worker_params in workers:
        assert np.array_equal(worker_params, params)  # every worker got the server's last step
        assert losses[-1] < 0.05 * losses[0]
        assert all(later <= earlier * 1.001 for earlier, later in zip(losses, losses[1:]))


def test_quantized_allreduce_by_name_is_within_its_bound_at_a_quarter_of_the_bytes() -> None:
    ranks = 2
    results = run_ranks(ranks, quantized_allreduce, timeout=60)
    module = example("quantized_allreduce")
    gradients = [module.gradient(rank).astype(np.float64) for rank in range(ranks)]
    exact = np.sum(gradients, axis=0)
    # one grid step of the 8-bit grid per rank: 2 * (block's max |x|) / 254
    step = [np.repeat(np.abs(g).reshape(-1, module.BLOCK).max(axis=1), module.BLOCK) * 2 / 254
            for g in gradients]
    bound = np.sum(step, axis=0)
    total, sent, float32_sent = results[0]
    error = total - exact
    assert all(np.array_equal(other[0], total) for other in results[1:])  # bit-identical everywhere
    assert np.all(np.abs(error) <= bound * (1 + 1e-6) + 1e-5)
    assert 0 < np.abs(error).mean() < bound.mean()  # it was quantized, and not at the bound
    assert abs(error.mean()) < 0.01 * bound.mean()  # stochastic rounding is unbiased
    assert 3.8 < float32_sent / sent < 4.0
