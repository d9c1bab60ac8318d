"""Step time with overlap on and off, beside a plain local SGD step, in one run.

Each rank holds three copies of the model (plain SGD, SparseCollOptimizer overlap=False, and
overlap=True) and times one step of each in turn, so all three see the same load; it prints
the median and best step of each and their ratios to the plain step::

    PYTHONPATH=. python tools/bench_overlap.py --ranks 2 --model deep --steps 12
    PYTHONPATH=. python tools/bench_overlap.py --ranks 4 --link 1gbit     # emulated links, root only

``--model mlp25m`` is 5000-5000-10 (its one big layer is the last gradient backward produces,
so there is little to overlap); ``deep`` is eight 1536-wide layers (19M parameters).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sparsecoll.bench.ranks import run_ranks

MODELS = {"mlp25m": [5000, 5000, 10], "deep": [1536] * 9 + [10]}


def build(widths: list[int]) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for wide, narrow in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(wide, narrow), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def rank_main(rank: int, world: int, place, model_name: str, algorithm: str, density: float, steps: int) -> dict:
    from sparsecoll.torch import SparseCollOptimizer, init_group

    store = place.enter(rank, world)  # its namespace on emulated links; one thread a rank
    widths = MODELS[model_name]
    with init_group(store=store, rank=rank, world_size=world, timeout=300, kernel_threads=1) as sync:
        setups = {}
        for mode in ("plain", "overlap_off", "overlap_on"):
            model = build(widths)
            sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            if mode == "plain":
                setups[mode] = (model, sgd)
            else:
                setups[mode] = (model, SparseCollOptimizer(sgd, sync, algorithm, density,
                                                           overlap=mode == "overlap_on"))
        generator = torch.Generator().manual_seed(rank)
        times: dict[str, list[float]] = {mode: [] for mode in setups}
        for _ in range(steps + 2):  # two untimed: compilation, and the first (never overlapped) step
            features = torch.randn(8, widths[0], generator=generator)
            labels = torch.randint(0, widths[-1], (8,), generator=generator)
            for mode, (model, optimizer) in setups.items():
                sync.barrier()
                started = time.perf_counter()
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(features), labels).backward()
                optimizer.step()
                times[mode].append(time.perf_counter() - started)
        launched = setups["overlap_on"][1]._scheduler.launched_by_backward
    return {mode: values[2:] for mode, values in times.items()} | {"launched_by_backward": launched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--model", choices=sorted(MODELS), default="deep")
    parser.add_argument("--algorithm", default="gtopk")
    parser.add_argument("--density", type=float, default=0.001)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--link", default=None, help="emulated links, e.g. 1gbit (root): see sparsecoll.bench.netem")
    args = parser.parse_args()
    _, results = run_ranks(args.ranks, rank_main, args.model, args.algorithm, args.density, args.steps,
                           link=args.link, timeout=1800, every_rank=True)
    slowest = {mode: [max(rank[mode][i] for rank in results) for i in range(args.steps)]
               for mode in ("plain", "overlap_off", "overlap_on")}
    plain = statistics.median(slowest["plain"])
    report = {"model": args.model, "ranks": args.ranks, "link": args.link or "loopback", "algorithm": args.algorithm, "density": args.density,
              "steps": args.steps, "launched_by_backward": results[0]["launched_by_backward"]}
    for mode, values in slowest.items():
        median = statistics.median(values)
        report[mode] = {"median_s": round(median, 4), "best_s": round(min(values), 4),
                        "median_over_plain": round(median / plain, 3)}
    report["on_over_off_median"] = round(report["overlap_on"]["median_s"] / report["overlap_off"]["median_s"], 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
