"""Ok-Topk through the optimizer: each bucket keeps its own OkTopkState, reuses it between
estimations, and saves it with the optimizer's state."""

from __future__ import annotations

import torch

from sparsecoll.torch import SparseCollOptimizer, init_group
from tests.ranks import run_ranks

STEPS = 5
INTERVAL = 2


def training_rank(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    with init_group(timeout=60, kernel_threads=1) as sync:
        optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync, "oktopk", 0.05,
                                        bucket_bytes=2048, algorithm_options={"interval": INTERVAL})
        generator = torch.Generator().manual_seed(rank)
        features, labels = torch.randn(32, 16, generator=generator), torch.randint(0, 4, (32,), generator=generator)
        losses = []
        for _ in range(STEPS):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(features), labels)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        states = [(bucket.compressed, state.estimations, state.age, state.local_threshold)
                  for bucket, state in zip(optimizer.buckets, optimizer.algorithm_states)]
        saved = optimizer.state_dict()["sparsecoll"]["algorithm"]
        return {"losses": losses, "states": states, "saved": saved}


def test_each_bucket_reuses_its_own_thresholds_and_saves_them() -> None:
    results = run_ranks(2, training_rank, timeout=180, group_kwargs=None)
    for result in results:
        sparse = [state for state in result["states"] if state[0]]
        assert len(sparse) >= 2, result["states"]  # several buckets, each with its own memory
        # estimations on steps 0, 2, 4 only: the other steps reused the thresholds
        assert all(estimations == -(-STEPS // INTERVAL) for _, estimations, _, _ in sparse), sparse
        assert len({threshold for *_, threshold in sparse}) == len(sparse), sparse
        assert [saved["estimations"] for saved in result["saved"] if saved and saved["shape"]] == \
            [estimations for _, estimations, _, _ in sparse]
        assert result["losses"][-1] < result["losses"][0]
