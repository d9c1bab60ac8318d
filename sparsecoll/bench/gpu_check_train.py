"""The GPU check's ``train`` step: two ranks train a small CUDA model (run by
:mod:`sparsecoll.bench.gpu_check`).

Each rank, on ``LOCAL_RANK``'s device (both on GPU 0 of a one-GPU machine), over the UCX backend:

1. builds the same MLP (about 1M parameters) and trains it for 20 steps on its own batches:
   with plain local SGD first (the step time the others add to), then with
   :class:`~sparsecoll.torch.SparseCollOptimizer`, then as a DDP module with sparsecoll's comm
   hook (gtopk, density 0.1%, momentum in the hook), beside a Gloo default process group (NCCL
   refuses two ranks on one GPU);
2. counts the device<->host copies of the 20 steps two ways: the library's own tally
   (``sparsecoll.transport.device.host_copies``, where this tree has it) and an independent
   audit of the array libraries' copy calls (:mod:`sparsecoll.bench.host_copy_audit`); a copy
   of a tenth of the parameters' bytes or more counts as d-sized, and the issue allows none;
3. hashes its parameters at the end: the replicas must be identical.

With ``--dry-run`` the same runs on the CPU (a small model, 2 steps) over UCX on loopback TCP.
"""

from __future__ import annotations

import hashlib
import os
import time
import traceback
from collections.abc import Sequence
from typing import Any

from sparsecoll.bench.gpu_check import DRY, FAIL, OK, SKIP, Row, emit, step_main
from sparsecoll.bench.host_copy_audit import DEVICE_TO_HOST, HOST_TO_DEVICE, HostCopyAudit, library_copies

DENSITY = 0.001
DEVICE_STEPS, DRY_STEPS = 20, 2
DEVICE_WIDTHS, DRY_WIDTHS = (512, 1024, 512, 10), (32, 64, 10)
BATCH = 64
LARGE_FRACTION = 10
"""A copy of at least 1/LARGE_FRACTION of the parameters' bytes is d-sized."""
MODES = ("optimizer", "ddp-hook")
BASELINE = "plain"
"""Plain local SGD, no communication: the forward + backward + update that the modes add to."""


def build_model(widths: Sequence[int], device: Any) -> Any:
    """The same MLP on every rank (seeded), on ``device``."""
    import torch

    torch.manual_seed(0)
    layers: list[Any] = []
    for inputs, outputs in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(inputs, outputs), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1]).to(device)


def train_mode(sync: Any, mode: str, device: Any, widths: Sequence[int], steps: int, rank: int) -> dict[str, Any]:
    """``steps`` training steps of one mode; the copy counts, losses, step time and parameter hash."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from sparsecoll.torch import CommHookState, SparseCollOptimizer, comm_hook

    model = build_model(widths, device)
    parameters = sum(p.numel() for p in model.parameters())
    state = None
    if mode == BASELINE:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    elif mode == "optimizer":
        optimizer = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), sync,
                                        "gtopk", DENSITY)
    else:
        model = DistributedDataParallel(model)
        state = CommHookState(sync, "gtopk", DENSITY, momentum=0.9)
        model.register_comm_hook(state, comm_hook)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    counted = library_copies()
    losses = []
    audit = HostCopyAudit(large_bytes=4 * parameters // LARGE_FRACTION)
    synchronize()
    if counted:
        counted[1]()
    started = time.perf_counter()
    with audit:
        for step in range(steps):
            generator = torch.Generator(device=device).manual_seed(1000 * step + rank)
            features = torch.randn(BATCH, widths[0], generator=generator, device=device)
            labels = torch.randint(0, widths[-1], (BATCH,), generator=generator, device=device)
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(features), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        synchronize()
    seconds = time.perf_counter() - started
    library = counted[0]()._asdict() if counted else None
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
    if state is not None:
        state.close()
    return {"parameters": parameters, "steps": steps, "step_ms": 1e3 * seconds / steps,
            "losses": [float(loss) for loss in losses], "digest": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
            "audit": audit.tally.__dict__, "large_bytes": audit.large_bytes, "library": library}


def train_rank(rank: int, world: int, dry_run: bool) -> dict[str, Any]:
    """Both modes on this rank; a mode that raises is recorded and the next one still runs."""
    import torch
    import torch.distributed as dist

    from sparsecoll.torch import init_group

    if dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    widths, steps = (DRY_WIDTHS, DRY_STEPS) if dry_run else (DEVICE_WIDTHS, DEVICE_STEPS)
    results: dict[str, Any] = {}
    dist.init_process_group("gloo")  # env://, the launcher's store, as under torchrun
    try:
        with init_group(timeout=30) as sync:  # a peer that raised is noticed well inside the step timeout
            for mode in (BASELINE, *MODES):  # the baseline first: it also warms CUDA and cuBLAS up
                try:
                    results[mode] = train_mode(sync, mode, device, widths, steps, rank)
                except Exception as error:  # recorded in the table; the next mode still runs
                    results[mode] = {"error": f"{type(error).__name__}: {error}",
                                     "where": traceback.format_exc().strip().splitlines()[-3:]}
    finally:
        dist.destroy_process_group()
    return results


def rows_from(results: Sequence[dict[str, Any]], dry_run: bool) -> list[Row]:
    """One row per mode from both ranks' results: replicas, d-sized copies, step time."""
    rows = []
    if dry_run:
        rows.append(Row("train", "CUDA model, 2 ranks on one GPU", DRY))
    where = "CPU" if dry_run else "CUDA"
    for mode in MODES:
        first, second = results[0][mode], results[1][mode]
        errors = [f"rank {rank}: {result['error']} at {result['where']}" for rank, result in
                  enumerate((first, second)) if "error" in result]
        if errors:
            rows.append(Row("train", f"{mode} gtopk 0.1% ({where})", FAIL, note="; ".join(errors)[:600]))
            continue
        identical = first["digest"] == second["digest"]
        audit = first["audit"]
        large = audit["large"][DEVICE_TO_HOST] + audit["large"][HOST_TO_DEVICE]
        library = first["library"]
        notes = ["replicas identical" if identical else "REPLICAS DIFFER",
                 f"audit: {audit['count'][DEVICE_TO_HOST]} D2H + {audit['count'][HOST_TO_DEVICE]} H2D copies, "
                 f"largest {audit['largest']} B, d-sized >= {first['large_bytes']} B",
                 "library tally: " + (f"{library['count']} copies, largest {library['largest']} B" if library
                                      else "host_copies() not in this tree"),
                 f"loss {first['losses'][0]:.3f} -> {first['losses'][-1]:.3f}"]
        library_large = bool(library) and library["largest"] >= first["large_bytes"]
        status = OK if identical and large == 0 and not library_large else FAIL
        plain = results[0].get(BASELINE, {}).get("step_ms")
        baseline = f"{first['step_ms']:.3g} ms/step" + (f" (plain SGD {plain:.3g})" if plain else "")
        rows.append(Row("train", f"{mode} gtopk 0.1% ({where}, {first['parameters']} params, {first['steps']} steps)",
                        status, f"{large} d-sized copies", baseline, "; ".join(notes),
                        {"rank0": first, "rank1_digest": second["digest"], "plain_step_ms": plain}))
    return rows


def train_rows(dry_run: bool) -> None:
    """Run the two ranks and print their rows (a SKIP row when UCX or a CUDA torch is missing)."""
    from sparsecoll.bench.gpu_check_ranks import missing_modules
    from sparsecoll.launch import RankCrashed, spawn

    missing = missing_modules(["ucxx"])
    if not missing and not dry_run:
        import torch

        missing = "" if torch.cuda.is_available() else "torch has no CUDA device"
    if missing:
        emit(Row("train", "two ranks training", SKIP, note=missing))
        return
    timeout = float(os.environ.get("GPU_CHECK_STEP_TIMEOUT", 120)) - 10
    try:
        results = spawn(2, train_rank, dry_run, timeout=max(10.0, timeout), env={"SPARSECOLL_BACKEND": "ucx"},
                        per_rank_env={rank: {"LOCAL_RANK": str(rank)} for rank in range(2)})
    except RankCrashed as error:
        emit(Row("train", "two ranks training", FAIL, note=str(error)[-600:]))
        return
    if not all(isinstance(result, dict) for result in results):
        emit(Row("train", "two ranks training", FAIL, note=f"{results!r}"[:600]))
        return
    for row in rows_from(results, dry_run):
        emit(row)


def main(argv: Sequence[str] | None = None) -> None:
    step_main(argv, {"train": train_rows}, "the GPU check's training step")


if __name__ == "__main__":
    main()
