"""The SparseCollOptimizer's own work per step, in gradient-sized passes, on one rank.

One rank, no network: a 25M-parameter MLP (5000-5000-10 by default), one thread. Per step it
times the whole iteration (``zero_grad()``, forward, backward, ``step()``) with the wrapper and,
on a copy of the model, with the plain ``torch.optim.SGD`` it replaces (same momentum and weight
decay), and divides their difference (the wrapper's work, wherever it happens: a cost moved into
backward counts too) by one ``np.add`` over the gradient's bytes (``np.add(a, b, out=c)``,
float32). The ``step()`` calls alone are reported beside it. The issue (#21) puts the wrapper at
about 6 passes before the fused pass, and asks for at most 2.

With ``--trees A B ...`` the tool runs itself once per source tree (``PYTHONPATH=tree``), the
trees taking turns ``--rounds`` times, so that a before/after pair is measured in the same run
under the same load; each line reports medians.

    PYTHONPATH=. python tools/step_passes.py --trees /path/to/main . --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def mlp(widths: str):
    import torch

    sizes = [int(width) for width in widths.split("-")]
    layers: list = []
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1]), sizes


def measure(args: argparse.Namespace) -> dict:
    """Medians (seconds) of the wrapper's step, the plain SGD step and one np.add, on one rank;
    the three are timed in turn within each step, so that they share the machine's load."""
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    os.environ.setdefault("SPARSECOLL_SECRET", "step-passes")
    import numpy as np
    import torch

    from sparsecoll.torch import SparseCollOptimizer, init_group

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, sizes = mlp(args.widths)
    twin = copy.deepcopy(model)
    hyper = {"lr": 0.01, "momentum": args.momentum, "weight_decay": args.weight_decay}
    plain = torch.optim.SGD(twin.parameters(), **hyper)
    features = torch.randn(args.batch, sizes[0])
    labels = torch.randint(0, sizes[-1], (args.batch,))
    elements = sum(param.numel() for param in model.parameters())
    a, b, c = (np.random.default_rng(seed).standard_normal(elements).astype(np.float32) for seed in range(3))
    seconds: dict[str, list[float]] = {"wrapper_iteration": [], "plain_iteration": [], "wrapper_step": [],
                                       "plain_step": [], "np_add": []}
    with init_group(timeout=300, kernel_threads=args.threads) as sync:
        wrapped = SparseCollOptimizer(torch.optim.SGD(model.parameters(), **hyper), sync, args.algorithm,
                                      args.density, clip_norm=args.clip_norm)
        for step in range(args.warmup + args.steps):
            for net, optimizer, name in ((model, wrapped, "wrapper"), (twin, plain, "plain")):
                started = time.perf_counter()
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(net(features), labels).backward()
                stepping = time.perf_counter()
                optimizer.step()
                ended = time.perf_counter()
                seconds[f"{name}_iteration"].append(ended - started)
                seconds[f"{name}_step"].append(ended - stepping)
            started = time.perf_counter()
            np.add(a, b, out=c)
            seconds["np_add"].append(time.perf_counter() - started)
    return {"parameters": elements, **{name: statistics.median(times[args.warmup:])
                                       for name, times in seconds.items()}}


def report(tree: str, numbers: dict) -> str:
    extra = numbers["wrapper_iteration"] - numbers["plain_iteration"]
    return (f"{tree:<28} params {numbers['parameters']:>10,}  iteration {numbers['wrapper_iteration'] * 1e3:7.1f} ms  "
            f"plain SGD iteration {numbers['plain_iteration'] * 1e3:6.1f} ms  (step() {numbers['wrapper_step'] * 1e3:5.1f} "
            f"against {numbers['plain_step'] * 1e3:5.1f} ms)  np.add {numbers['np_add'] * 1e3:5.1f} ms  "
            f"wrapper {extra * 1e3:6.1f} ms = {extra / numbers['np_add']:.2f} passes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="5000-5000-10", help="MLP layer widths, input first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--algorithm", default="gtopk")
    parser.add_argument("--density", type=float, default=0.001)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--clip-norm", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--trees", nargs="*", help="source trees to compare, each run in its own process")
    parser.add_argument("--rounds", type=int, default=1, help="turns each tree takes (with --trees)")
    parser.add_argument("--json", action="store_true", help="print one JSON line (used with --trees)")
    args = parser.parse_args(argv)
    if not args.trees:
        numbers = measure(args)
        print(json.dumps(numbers) if args.json else report(".", numbers), flush=True)
        return
    forwarded = [arg for arg in (argv if argv is not None else sys.argv[1:])]
    cut = forwarded.index("--trees")
    forwarded = forwarded[:cut] + [arg for arg in forwarded[cut + 1 + len(args.trees):]]
    while "--rounds" in forwarded:
        position = forwarded.index("--rounds")
        del forwarded[position:position + 2]
    results: dict[str, list[dict]] = {tree: [] for tree in args.trees}
    for _ in range(args.rounds):
        for tree in args.trees:
            env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *forwarded, "--json"], env=env,
                                  capture_output=True, text=True, timeout=args.timeout, cwd=Path(tree).resolve())
            if done.returncode != 0:
                raise SystemExit(f"{tree}: {done.stderr[-3000:]}")
            results[tree].append(json.loads(done.stdout.strip().splitlines()[-1]))
    for tree, runs in results.items():
        merged = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(report(tree, merged), flush=True)


if __name__ == "__main__":
    main()
