"""SparseCollOptimizer behaves as a torch.optim.Optimizer: step and state-dict hooks, zero_grad's
set_to_none with gradients that are bucket views after every step, add_param_group, an LR scheduler."""

from __future__ import annotations

import pytest
import torch

from sparsecoll.errors import CollectiveMismatchError
from sparsecoll.torch import SparseCollOptimizer, init_group
from tests.ranks import run_ranks
from tests.torch.test_optimizer import batch, flat_params, net


def views_of_buckets(optimizer) -> bool:
    """True when every bucketed parameter's gradient is its bucket region."""
    return all(param.grad is not None and param.grad.data_ptr() == bucket.slice(position).data_ptr()
               for bucket in optimizer.buckets for position, param in enumerate(bucket.params))


def api_rank(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    outcome: dict = {}
    with init_group(timeout=60, kernel_threads=1) as sync:
        model = net(hidden=16)
        optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sync,
                                        "gtopk", 0.2, module=model)
        calls = []
        pre = optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("pre", opt.steps)))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", opt.steps)))
        optimizer.register_state_dict_pre_hook(lambda opt: calls.append(("save", None)))
        optimizer.register_state_dict_post_hook(lambda opt, state: {**state, "extra": 7})
        optimizer.register_load_state_dict_pre_hook(lambda opt, state: calls.append(("load", state.get("extra"))))
        optimizer.register_load_state_dict_post_hook(lambda opt: calls.append(("loaded", opt.steps)))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)

        bound = []
        for step in range(4):
            if step % 2:
                model.zero_grad()  # torch's: set_to_none=True
            else:
                optimizer.zero_grad()
            outcome.setdefault("none_after_zero_grad", []).append(all(p.grad is None for p in model.parameters()))
            features, labels = batch(step, rank)
            torch.nn.functional.cross_entropy(model(features), labels).backward()
            optimizer.step()
            bound.append(views_of_buckets(optimizer))
            scheduler.step()
            if step == 1:
                pre.remove()
        outcome["bound"] = bound
        optimizer.zero_grad(set_to_none=False)
        outcome["zeroed_views"] = views_of_buckets(optimizer) and all(
            bool((p.grad == 0).all()) for p in model.parameters())
        outcome["lr"] = optimizer.param_groups[0]["lr"]
        state = optimizer.state_dict()
        outcome["extra"] = state.get("extra")
        optimizer.load_state_dict(state)
        outcome["calls"] = list(calls)

        torch.manual_seed(rank)  # a different head on every rank: add_param_group broadcasts rank 0's
        head = torch.nn.Linear(3, 2)
        optimizer.add_param_group({"params": head.parameters(), "lr": 0.05})
        for step in range(4, 7):
            optimizer.zero_grad()
            features, labels = batch(step, rank)
            loss = torch.nn.functional.cross_entropy(head(model(features)), labels % 2)
            loss.backward()
            optimizer.step()
        outcome["with_head"] = torch.cat([flat_params(model), flat_params(head)]).tolist()
        outcome["head_buckets"] = [bucket.group_index for bucket in optimizer.buckets].count(1)
        outcome["head_bound"] = views_of_buckets(optimizer)

        odd = torch.nn.Linear(3, 4 if rank == 1 else 2)  # rank 1 disagrees: every rank must raise
        with pytest.raises(CollectiveMismatchError, match="differ across ranks"):
            optimizer.add_param_group({"params": odd.parameters()})
    return outcome


def test_optimizer_hooks_zero_grad_scheduler_and_add_param_group_behave_as_torch() -> None:
    per_rank = run_ranks(2, api_rank, timeout=120, group_kwargs=None)
    for outcome in per_rank:
        assert outcome["none_after_zero_grad"] == [True] * 4
        assert outcome["bound"] == [True] * 4  # .grad holds the bucket's reduced mean after every step
        assert outcome["zeroed_views"]
        assert outcome["calls"] == [("pre", 0), ("post", 1), ("pre", 1), ("post", 2), ("post", 3), ("post", 4),
                                    ("save", None), ("load", 7), ("loaded", 4)]
        assert outcome["extra"] == 7
        assert outcome["lr"] == pytest.approx(0.1 * 0.5 ** 2)
        assert outcome["head_buckets"] >= 1 and outcome["head_bound"]
    assert per_rank[0]["with_head"] == per_rank[1]["with_head"]
