"""One row of ``sparsecoll-bench train`` on one rank: train (or only step), evaluate, time.

Real-data models train for ``epochs`` and evaluate the test set ``evals_per_epoch`` times an
epoch (and at every epoch's end); each rank scores its share of the test set and the counts are
summed over the sparsecoll group. The clock of the curve counts training steps only: evaluation
is excluded. Step-time models (``mlp25m``) take ``warmup`` untimed steps and ``steps`` timed ones.
A configuration that passes ``cap_seconds`` (training and evaluation) stops at the next check,
which all ranks agree on, and says ``cut``. A rank that makes no progress (no step, evaluation
or warm-up) for ``stall_seconds`` ends with a message that names the row (:mod:`.stall`).

Compute-only time is measured afterwards in the same process, all ranks at once (so under the
load of the run): forward, backward and a plain SGD step on a copy of the model, no communication;
the median step.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparsecoll.bench import train_methods
from sparsecoll.bench.train_models import MODELS, parameter_count, synthetic_batches

COMPUTE_ONLY_STEPS = 20
"""Steps timed for the compute-only column (after one untimed); the median is kept, as the
machine's other load comes in bursts."""


@dataclass
class Plan:
    """What every configuration of one run shares."""

    model: str = "mlp"
    epochs: int = 30
    batch: int = 32
    lr: float = 0.1
    hidden: int = 128
    seed: int = 0
    warmup_epochs: float = 1.0
    evals_per_epoch: int = 4
    cap_seconds: float = 600.0
    steps: int = 20
    warmup: int = 3
    compute_steps: int = COMPUTE_ONLY_STEPS
    rows_file: str | None = None
    """Rank 0 appends each finished row here (JSON lines), so a long run killed midway keeps them."""
    stall_seconds: float = 360.0
    """A rank that takes no step (or warm-up, or evaluation) for this long ends with a named message
    (:mod:`sparsecoll.bench.stall`); a minute past the collectives' own 300 s, so theirs come first."""


class WireCounter:
    """Bytes this rank's interface transmitted (its namespace's, on emulated links): what
    really crossed the link, headers included; None on the host's shared network."""

    def __init__(self, interface: str | None) -> None:
        self.path = f"/sys/class/net/{interface}/statistics/tx_bytes" if interface else None

    def read(self) -> int | None:
        if self.path is None:
            return None
        with open(self.path) as handle:
            return int(handle.read())


class _Clock:
    """Training seconds and wire bytes, counted only while steps run."""

    def __init__(self, wire: WireCounter) -> None:
        self.wire, self.seconds, self.wire_bytes = wire, 0.0, 0

    def __enter__(self) -> _Clock:
        self._bytes = self.wire.read()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._started
        if self._bytes is not None:
            self.wire_bytes += self.wire.read() - self._bytes


def _no_progress_report(stage: str) -> None:
    """Where ``train_configuration`` reports progress when no watchdog listens."""


def train_configuration(sync: Any, data: Sequence[np.ndarray] | None, config: dict[str, Any], plan: Plan,
                        wire: WireCounter, progress: Callable[[str], None] = _no_progress_report) -> dict[str, Any]:
    """Train (or step) one configuration on this rank; the accuracies are the same on every rank.
    ``progress`` hears of every step, evaluation and the warm-up (a :class:`~sparsecoll.bench.stall.StallWatchdog`'s
    ``beat``)."""
    import torch

    spec = MODELS[plan.model]
    dtype = getattr(torch, config.get("dtype", "float32"))  # e.g. "bfloat16": the model and its inputs
    if spec.step_time_only:
        model = spec.build(0, 0, 0, plan.seed).to(dtype)
        total = plan.warmup + plan.steps
        steps_per_epoch = total
    else:
        train_x, train_y, test_x, test_y = (torch.from_numpy(array) for array in data)
        data = (train_x.to(dtype), train_y, test_x.to(dtype), test_y)
        train_x = data[0]
        model = spec.build(train_x.shape[1], plan.hidden, int(train_y.max()) + 1, plan.seed).to(dtype)
        steps_per_epoch = len(train_y) // (plan.batch * sync.size)
        if steps_per_epoch == 0:
            raise ValueError(f"--batch {plan.batch} on {sync.size} ranks is more than the {len(train_y)} training "
                             "examples")
        total = plan.epochs * steps_per_epoch
    compute_copy = copy.deepcopy(model)
    hyper = train_methods.Hyper(plan.lr, plan.seed, int(plan.warmup_epochs * steps_per_epoch), total, sync.size,
                                steps_per_epoch=steps_per_epoch)
    if spec.step_time_only:
        hyper.warmup_steps = 0
    batches = batches_of(data, spec, plan, sync.rank)
    _warm_up(sync, model, config, hyper, batches)
    progress("the warm-up step")
    method = train_methods.build(config.get("method", "optimizer"), model, sync, config, hyper)
    try:
        if spec.step_time_only:
            row = _step_only(sync, method, batches, plan, wire, progress)
        else:
            row = _train(sync, method, data, plan, steps_per_epoch, wire, progress)
    finally:
        method.close()
    row["compute_seconds_per_step"] = compute_only(sync, compute_copy, batches, plan.lr, plan.compute_steps)
    return {**config, **row, **method.info, "parameters": parameter_count(model)}


def batches_of(data: Sequence[Any] | None, spec: Any, plan: Plan, rank: int) -> list[tuple[Any, Any]]:
    """A few batches of this rank's shape: random ones for step-time models, else the first of the
    training set (for the warm-up and the compute-only steps)."""
    if spec.step_time_only:
        return synthetic_batches(rank, spec.fixed_batch, plan.seed)
    train_x, train_y = data[0], data[1]
    return [(train_x[i * plan.batch:(i + 1) * plan.batch], train_y[i * plan.batch:(i + 1) * plan.batch])
            for i in range(4)]


def _warm_up(sync: Any, model: Any, config: dict[str, Any], hyper: train_methods.Hyper,
             batches: list[tuple[Any, Any]]) -> None:
    """One untimed step of the configuration's method on a throwaway copy of the model, at its
    final density, so that kernel compilation (Numba's, on first use in a process) and
    connection set-up do not count in its time (as nccl-tests' warm-up iterations)."""
    warm_config = {**config, "hook_options": {**config.get("hook_options", {}), "start_iter": 0}}
    warm_hyper = train_methods.Hyper(hyper.lr, hyper.seed, 0, hyper.total_steps, hyper.world)
    method = train_methods.build(config.get("method", "optimizer"), copy.deepcopy(model), sync, warm_config,
                                 warm_hyper)
    try:
        _step(method, *batches[0])
    finally:
        method.close()
    sync.barrier()


def _train(sync: Any, method: train_methods.StepMethod, data: Sequence[Any], plan: Plan, steps_per_epoch: int,
           wire: WireCounter, progress: Callable[[str], None] = _no_progress_report) -> dict[str, Any]:
    """Epochs of training with evaluations; the curve holds (step, training seconds, accuracy)."""
    import torch

    train_x, train_y, test_x, test_y = data
    every = max(1, steps_per_epoch // plan.evals_per_epoch)
    clock, started = _Clock(wire), time.perf_counter()
    losses, epoch_loss, epoch_accuracy, curve, epoch_bytes, critical_epochs = [], [], [], [], [], []
    bytes_sent, last_epoch_bytes, steps, cut = 0.0, deque(maxlen=steps_per_epoch), 0, False
    for epoch in range(plan.epochs):
        order = torch.from_numpy(np.random.default_rng(plan.seed + epoch).permutation(len(train_y)))
        for step in range(steps_per_epoch):
            first = (step * sync.size + sync.rank) * plan.batch
            chosen = order[first:first + plan.batch]
            with clock:
                loss = _step(method, train_x[chosen], train_y[chosen])
            steps += 1
            progress(f"step {steps}")
            losses.append(loss)
            sent = method.last_bytes()
            bytes_sent += sent
            last_epoch_bytes.append(sent)
            if (step + 1) % every == 0 or step == steps_per_epoch - 1:
                accuracy, cut = _evaluate(sync, method.forward, test_x, test_y, time.perf_counter() - started,
                                          plan.cap_seconds)
                curve.append([steps, clock.seconds, accuracy])
                progress(f"the evaluation after step {steps}")
                if cut:
                    break
        epoch_loss.append(float(np.mean(losses[-steps_per_epoch:])))
        epoch_accuracy.append(curve[-1][2])
        epoch_bytes.append(bytes_sent - sum(epoch_bytes))
        if getattr(getattr(method.optimizer, "density_schedule", None), "critical", False):  # Accordion's choice
            critical_epochs.append(epoch)
        if cut:
            break
    return {"accuracy": epoch_accuracy[-1], "epoch_loss": epoch_loss, "epoch_accuracy": epoch_accuracy,
            "epoch_bytes": epoch_bytes, "critical_epochs": critical_epochs, "curve": curve, "evals_per_epoch": plan.evals_per_epoch, "final_loss": float(np.mean(losses[-20:])),
            "steps": steps, "epochs_run": len(epoch_loss), "cut": cut, "bytes_per_step": bytes_sent / steps,
            "steady_bytes_per_step": float(np.mean(last_epoch_bytes)),
            "wire_bytes_per_step": clock.wire_bytes / steps if wire.path else None,
            "seconds_per_step": clock.seconds / steps, "training_seconds": clock.seconds}


def _step_only(sync: Any, method: train_methods.StepMethod, batches: list, plan: Plan,
               wire: WireCounter, progress: Callable[[str], None] = _no_progress_report) -> dict[str, Any]:
    """``warmup`` untimed steps, then ``steps`` timed ones on random data; no accuracy."""
    clock, started = _Clock(wire), time.perf_counter()
    bytes_sent, timed, cut = 0.0, 0, False
    for step in range(plan.warmup + plan.steps):
        inputs, labels = batches[step % len(batches)]
        if step < plan.warmup:
            _step(method, inputs, labels)
        else:
            with clock:
                _step(method, inputs, labels)
            timed += 1
            bytes_sent += method.last_bytes()
        progress(f"step {step + 1}")
        over = np.array([time.perf_counter() - started > plan.cap_seconds], np.float64)
        if sync.allreduce(over)[0][0] > 0:
            cut = True
            break
    timed = max(timed, 1)
    return {"accuracy": None, "steps": timed, "cut": cut, "bytes_per_step": bytes_sent / timed,
            "steady_bytes_per_step": bytes_sent / timed,
            "wire_bytes_per_step": clock.wire_bytes / timed if wire.path else None,
            "seconds_per_step": clock.seconds / timed if clock.seconds else None, "training_seconds": clock.seconds}


def _step(method: train_methods.StepMethod, inputs: Any, labels: Any) -> float:
    import torch

    method.optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(method.forward(inputs).float(), labels)
    loss.backward()
    method.step()
    return loss.item()


def _evaluate(sync: Any, forward: Any, test_x: Any, test_y: Any, elapsed: float,
              cap_seconds: float) -> tuple[float, bool]:
    """Test accuracy over every rank's share of the test set, and whether any rank is past the cap."""
    import torch

    share = slice(sync.rank, None, sync.size)
    module = getattr(forward, "module", forward)  # DDP's forward would sync buffers: score the plain module
    with torch.no_grad():
        correct = float((module(test_x[share]).argmax(1) == test_y[share]).sum())
    totals, _ = sync.allreduce(np.array([correct, len(test_y[share]), elapsed > cap_seconds], np.float64))
    return float(totals[0] / totals[1]), bool(totals[2] > 0)


def compute_only(sync: Any, model: Any, batches: list, lr: float, steps: int = COMPUTE_ONLY_STEPS) -> float:
    """Seconds a step of forward, backward and plain SGD take with no communication, every rank
    at once (the ranks start together)."""
    import torch

    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=train_methods.MOMENTUM)
    method = train_methods.StepMethod(model, model, optimizer)
    sync.barrier()
    _step(method, *batches[0])
    times = []
    for step in range(steps):
        started = time.perf_counter()
        _step(method, *batches[step % len(batches)])
        times.append(time.perf_counter() - started)
    return float(np.median(times))
