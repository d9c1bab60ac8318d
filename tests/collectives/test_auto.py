"""``choose_algorithm`` on real ranks (every rank gets rank 0's pick) and calibration: a short run
on real ranks, and its inversion of the model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sparsecoll.bench import calibrate as calibration
from sparsecoll.collectives import cost_model
from sparsecoll.collectives.auto import choose_algorithm, shared_cost_model
from sparsecoll.collectives.cost_model import ENV_PATH, CostModel
from sparsecoll.errors import InvalidArgumentError
from tests.ranks import run_ranks

FAST = CostModel(alpha=5e-6, beta=8e-11, link="100 Gbit/s")
SLOW = CostModel(alpha=50e-6, beta=8e-9, link="1 Gbit/s")
SIZE = 25_000_000
DENSE_K, SPARSE_K = SIZE // 4, SIZE // 1000


async def pick_with_own_models(group, models: list[CostModel | None]) -> list[str]:
    """Each rank offers its own model; later calls use the shared one whatever they pass."""
    first = await choose_algorithm(group, SIZE, DENSE_K, model=models[group.rank])
    shared_at = group.seq
    cached = await choose_algorithm(group, SIZE, DENSE_K, model=SLOW)
    sparse = await choose_algorithm(group, SIZE, SPARSE_K)
    quantized = await choose_algorithm(group, SIZE, SPARSE_K, quantize_bits=8)
    assert group.seq == shared_at == 1  # one broadcast, then local picks only
    return [first, cached, sparse, quantized]


def test_every_rank_takes_rank_zeros_pick(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert FAST.choose(3, SIZE, DENSE_K) == "dense" and SLOW.choose(3, SIZE, DENSE_K) != "dense"
    # rank 1 holds a slow-link model, rank 2 none and a malformed file: neither matters
    picks = run_ranks(3, pick_with_own_models, [FAST, SLOW, None], timeout=60,
                      per_rank_env={2: {ENV_PATH: str(broken)}})
    expected = [FAST.choose(3, SIZE, DENSE_K), FAST.choose(3, SIZE, DENSE_K), FAST.choose(3, SIZE, SPARSE_K),
                FAST.choose(3, SIZE, SPARSE_K, quantize_bits=8)]
    assert picks == [expected] * 3


async def share_then_use(group) -> str:
    try:
        await shared_cost_model(group, timeout=20)
    except InvalidArgumentError as error:
        outcome = f"{type(error).__name__}: {error.message}"
    else:
        outcome = "shared"
    await group.barrier(timeout=10)  # the group is still usable
    return outcome


def test_a_malformed_file_on_rank_zero_fails_every_rank_promptly(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": 1, "alpha": -1}')
    outcomes = run_ranks(2, share_then_use, timeout=60, per_rank_env={0: {ENV_PATH: str(broken)}})
    assert outcomes[0].startswith("InvalidArgumentError") and "broken.json" in outcomes[0]
    assert outcomes[1] == "InvalidArgumentError: rank 0 could not load its cost model"


def test_a_short_calibration_writes_a_model_that_loads(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    measured = calibration.calibrate(2, None, str(path), iterations=1, timeout=180)
    loaded = CostModel.load(path)
    assert loaded == measured
    assert loaded.ranks == 2 and loaded.link == "loopback" and loaded.date
    for value in loaded.to_array():
        assert math.isfinite(value) and value >= 0
    assert loaded.alpha > 0 and loaded.beta > 0
    assert 0 < loaded.lone_select_ratio <= 1
    assert np.isfinite(loaded.predict("gtopk", 2, SIZE, SPARSE_K))


async def pick_alone(group) -> str:
    return await choose_algorithm(group, SIZE, SPARSE_K, model=SLOW)


def test_a_single_rank_goes_dense() -> None:
    assert run_ranks(1, pick_alone, timeout=60) == ["dense"]


def test_calibration_inverts_the_model() -> None:
    """Probe times the model itself predicts give back the model's α, β and selection costs."""
    truth = CostModel(alpha=3e-4, beta=1.5e-9, select_per_element=1e-9, select_fixed=7e-3, lone_select_ratio=0.6,
                      sketch_per_element=4e-8, reduce_per_element=7e-10, merge_per_pair=2e-8,
                      quantize_per_element=4e-8)
    ranks, large = 4, calibration.LARGE_BYTES // 4
    probes = [truth.doubling_allreduce(ranks, calibration.SMALL_COUNT),
              truth.ring_allreduce(ranks, large),
              *(truth.select(n) for n in calibration.SELECT_SIZES),
              truth.sketch_per_element * calibration.SKETCH_SIZE * cost_model.SKETCH_ROWS,
              truth.reduce_per_element * calibration.SELECT_SIZES[-1],
              truth.merge_per_pair * 2 * calibration.MERGE_PAIRS,
              truth.quantize_per_element * calibration.QUANTIZE_SIZE,
              truth.lone_select_ratio * truth.select(calibration.SELECT_SIZES[-1])]
    fitted = calibration.fit(ranks, np.array(probes), link="synthetic")
    for name in cost_model.PARAMETERS:
        assert math.isclose(getattr(fitted, name), getattr(truth, name), rel_tol=1e-3, abs_tol=1e-15), name


async def concurrent_auto_reductions(group) -> list[bytes]:
    """Two buckets reduced at once with algorithm="auto": the first use shares the model once."""
    import asyncio

    grads = [np.random.default_rng(10 * group.rank + b).standard_normal(50_000).astype(np.float32) for b in (0, 1)]
    results = await asyncio.gather(*(group.reduce_gradient(grad, "auto", density=0.01) for grad in grads))
    from sparsecoll.collectives.auto import ONLINE_PROBE_CALLS

    assert group.seq == 3 + ONLINE_PROBE_CALLS  # one broadcast, no file: the online calibration, two reductions
    return [result.dense().tobytes() for result, _ in results]


def test_concurrent_first_auto_calls_share_one_broadcast(tmp_path: Path) -> None:
    results = run_ranks(3, concurrent_auto_reductions, timeout=60,
                        env={ENV_PATH: str(tmp_path / "none.json")})
    assert all(not isinstance(result, Exception) for result in results), results
    assert results[0] == results[1] == results[2]
