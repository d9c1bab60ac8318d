"""One flat gradient buffer through error feedback and a collective: shared by the optimizer and
the DDP hook, so both keep the same state and send the same bytes.

These are coroutines of a :class:`sparsecoll.Group`; torch code runs them through a
:class:`sparsecoll.SyncGroup`.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from sparsecoll import registry
from sparsecoll.call import CommStats
from sparsecoll.collectives.cost_bytes import sparse_break_even
from sparsecoll.collectives.cost_model import QUANTIZE_BITS
from sparsecoll.collectives.hierarchical import HIERARCHICAL_ALGORITHMS, check_mode
from sparsecoll.collectives.lazy import LazyState
from sparsecoll.collectives.oktopk_state import OkTopkState
from sparsecoll.collectives.reduce import BUILTIN, check_algorithm_name
from sparsecoll.collectives.sparse_common import preselected, resolve_k
from sparsecoll.errors import CollectiveMismatchError
from sparsecoll.group import Group
from sparsecoll.torch.buckets import as_array, to_tensor
from sparsecoll.torch.device_launch import Launch, capture, launching
from sparsecoll.torch.error_feedback import ErrorFeedback
from sparsecoll.transport.staging import using_staging

AUTO_DENSE_ABOVE = 0.25
"""The most ``dense_above="auto"`` allows: a warm-up step denser than this reduces dense even
where its pairs would cost fewer bytes (DGC's warm-up starts dense; at P = 4 a float32
allgather breaks even here)."""
SCALECOM_BETA = 0.1
"""ScaleCom's low-pass filter factor for CLT-k (Chen et al. 2020, their experiments' beta)."""


def with_hierarchical(algorithm_options: dict | None, hierarchical: bool | str) -> dict:
    """The algorithm's options with ``hierarchical`` among them (left out when False, the default),
    so it reaches ``reduce_gradient`` with the rest (see :mod:`sparsecoll.collectives.hierarchical`)."""
    check_mode(hierarchical)
    options = dict(algorithm_options or {})
    if hierarchical is not False:
        options["hierarchical"] = hierarchical
    return options


@dataclass(slots=True)
class Compression:
    """How gradients are compressed: the hyperparameters the optimizer and the hook share."""

    algorithm: str = "gtopk"
    density: float = 0.001
    quantize_bits: int | None = None
    error_feedback: bool | None = True
    dense_above: float | str = "auto"
    """Steps denser than this (the warm-up's first) reduce dense. "auto": where the sparse call
    would send more bytes than the dense allreduce (:meth:`dense_cut`), at most
    :data:`AUTO_DENSE_ABOVE`."""
    seed: int = 0
    options: dict = field(default_factory=dict)
    """Extra keyword options of the algorithm (a registered compressor's factory arguments)."""
    memory_beta: float | None = None
    """ScaleCom's low-pass filter on the error-feedback memory (see :class:`ErrorFeedback`);
    None: the paper's 0.1 for "cltk", 1.0 (plain error feedback) for the others."""
    dense_fp16: bool = False
    """Plain dense reductions of float32 buckets (warm-up steps denser than ``dense_above``, dense
    buckets, the "dense" algorithm) travel as float16, as torch's ``fp16_compress_hook`` sends
    them: half the bytes. A mean that overflows float16 is redone in float32 on every rank.
    With a sparse algorithm it combines with ``quantize_bits``, which then quantizes the sparse
    steps' values while the dense steps go as float16."""

    def dense_cut(self, ranks: int, size: int, itemsize: int = 4) -> float:
        """The density above which a step of a ``size``-element bucket of ``itemsize``-byte
        values on ``ranks`` ranks reduces dense: ``dense_above``, or for "auto" the byte
        break-even of the algorithm's pairs (quantized with ``quantize_bits``) against the dense
        allreduce (float16 with ``dense_fp16`` and float32 values), at most AUTO_DENSE_ABOVE; an
        algorithm without a formula takes AUTO_DENSE_ABOVE."""
        if self.dense_above != "auto":
            return float(self.dense_above)
        dense_itemsize = 2 if self.dense_fp16 and itemsize == 4 else itemsize
        even = sparse_break_even(self.algorithm, ranks, size, itemsize, dense_itemsize, self.quantize_bits)
        return AUTO_DENSE_ABOVE if even is None else min(even, AUTO_DENSE_ABOVE)

    def sparse_at(self, density: float, ranks: int, size: int, itemsize: int = 4) -> bool:
        """Whether a compressed step at ``density`` sends a sparse part of such a bucket (else a
        dense allreduce): never for "dense", nor above :meth:`dense_cut`."""
        return self.algorithm != "dense" and density < self.dense_cut(ranks, size, itemsize)

    def filter_factor(self) -> float:
        """The memory_beta in force: the given one, else the algorithm's default."""
        if self.memory_beta is not None:
            return float(self.memory_beta)
        return SCALECOM_BETA if self.algorithm == "cltk" else 1.0

    def new_state(self) -> OkTopkState | None:
        """A bucket's memory of the algorithm between steps: Ok-Topk's thresholds and regions
        (for "oktopk", and for "auto", which may pick it), else None."""
        return OkTopkState() if self.algorithm in ("oktopk", "auto") else None

    def unbiased(self) -> bool:
        """Whether the compressor is unbiased (Wangni's random-k): error feedback diverges with it."""
        if self.algorithm == "allgather":
            return self.options.get("selection") == "randomk"
        if self.algorithm in registry.compressors() and self.algorithm not in registry.collectives():
            return bool(getattr(registry.compressor_factory(self.algorithm), "unbiased", False))
        return False

    def validate(self) -> None:
        """Raise ValueError with the reason when a setting cannot work."""
        check_algorithm_name(self.algorithm)
        builtin = self.algorithm in BUILTIN or self.algorithm == "auto"
        if not builtin and self.algorithm not in registry.collectives() and self.algorithm not in registry.compressors():
            raise ValueError(f"unknown algorithm {self.algorithm!r}: choose from {list(BUILTIN)}, 'auto', or "
                             "register one with sparsecoll.register_collective or register_compressor")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.dense_above != "auto" and (isinstance(self.dense_above, str) or not 0.0 < self.dense_above <= 1.0):
            raise ValueError(f"dense_above must be 'auto' or in (0, 1], got {self.dense_above!r}")
        if self.quantize_bits is not None and not builtin:
            raise ValueError(f"quantize_bits applies to the builtin algorithms, not {self.algorithm!r} "
                             "(a registered compressor quantizes itself)")
        if self.quantize_bits is not None and self.quantize_bits not in QUANTIZE_BITS:
            raise ValueError(f"quantize_bits must be one of {QUANTIZE_BITS}, got {self.quantize_bits}")
        if self.memory_beta is not None and not 0.0 < self.memory_beta <= 1.0:
            raise ValueError(f"memory_beta must be in (0, 1], got {self.memory_beta}")
        if self.options.get("hierarchical") is True and (self.quantize_bits is not None
                                                        or self.algorithm not in HIERARCHICAL_ALGORITHMS):
            raise ValueError(f"hierarchical=True runs {list(HIERARCHICAL_ALGORITHMS)} without quantize_bits, "
                             f"not {self.algorithm!r}" + (" with quantize_bits" if self.quantize_bits else "")
                             + " (use hierarchical='auto' to go two-level only where it can)")
        dense_quantized = self.quantize_bits is not None and self.algorithm == "dense"
        if self.dense_fp16 and (dense_quantized or self.options.get("hierarchical") is True):
            raise ValueError("dense_fp16 sends the flat dense allreduce as float16; it does not combine with "
                             + ("quantize_bits on the dense algorithm (LAQ's wire format)" if dense_quantized
                                else "hierarchical=True (two-level reductions stay float32)"))
        if self.error_feedback is None:  # the default: on for contractive compressors only
            self.error_feedback = not self.unbiased()
        elif self.error_feedback and self.unbiased():
            raise ValueError(f"error feedback diverges with an unbiased sparsifier ({self.algorithm!r} with "
                             "random-k): it keeps -g(1-p)/p of every unsent coordinate, which grows without "
                             "bound (Wangni et al. send g/p and keep nothing); use error_feedback=False")


async def reduce_buffer(group: Group, grad: torch.Tensor, memory: ErrorFeedback, compression: Compression,
                        *, density: float, step: int, seed: int, compressed: bool = True,
                        momentum: float = 0.0, nesterov: bool = False, lazy: LazyState | None = None,
                        algorithm_state: OkTopkState | None = None, launch: Launch | None = None,
                        source: torch.Tensor | None = None) -> CommStats:
    """Replace ``grad`` (this rank's gradient) by the mean over ranks of what was sent.

    With ``source`` the gradient is read there and ``grad`` only receives the result; a sparse
    result then clears the entries the previous sparse result left in ``grad`` (k writes instead
    of zeroing the whole buffer), unless ``grad`` was written since (its version moved).

    Dense buffers, the "dense" algorithm and warm-up steps denser than
    :meth:`Compression.dense_cut` use an
    allreduce of ``residual + momentum-corrected gradient`` (nothing is left behind); the others
    send a sparse part of it and keep the rest (error feedback). ``algorithm_state`` is the
    bucket's :meth:`Compression.new_state`, passed to the algorithm as ``state``. A CUDA buffer's
    work runs on ``launch``'s device and stream (:func:`.device_launch.capture` of the caller's
    thread; by default this thread's), and only k-sized arrays cross to the host, through the
    bucket's pinned buffers on a side stream (``memory.staging``, see
    :mod:`sparsecoll.transport.staging`; the dense path stages the buffer, as a dense reduction
    on the host must).

    1. :meth:`ErrorFeedback.prepare` folds, corrects and accumulates in one pass over the
       gradient, finds this rank's top-k when the algorithm selects one here, and (sparse
       case) zeroes ``grad``;
    2. the collective runs, taking that top-k instead of reading the buffer again;
    3. ``grad`` receives the k reduced values divided by P, and ``memory.update_indices`` says
       where they are (the optimizer's sparse update reads it), None after a dense reduction;
    4. :meth:`ErrorFeedback.settle` removes what was sent from the residual and masks momentum,
       touching those k entries only.
    """
    with launching(capture(grad) if launch is None else launch), using_staging(memory.staging):
        return await _reduce(group, grad, memory, compression, density=density, step=step, seed=seed,
                             compressed=compressed, momentum=momentum, nesterov=nesterov, lazy=lazy,
                             algorithm_state=algorithm_state, source=source)


async def _reduce(group: Group, grad: torch.Tensor, memory: ErrorFeedback, compression: Compression, *,
                  density: float, step: int, seed: int, compressed: bool, momentum: float, nesterov: bool,
                  lazy: LazyState | None, algorithm_state: OkTopkState | None,
                  source: torch.Tensor | None) -> CommStats:
    memory_beta = compression.filter_factor()
    sparse = compressed and compression.sparse_at(density, group.size, grad.numel(), grad.element_size())
    k = local_topk(compression, group, grad.numel(), density, step) if sparse else 0
    source = grad if source is None else source
    outgoing, selection = memory.prepare(source, momentum, nesterov, memory_beta, k=k, seed=seed,
                                         zero_grad=sparse and source is grad)
    previous = memory.update_indices if memory.result_version == grad._version else None
    memory.update_indices = None
    array = as_array(outgoing)
    if not sparse:
        bits = compression.quantize_bits if compression.algorithm == "dense" else None  # warm-up stays exact
        lazy = lazy if compression.algorithm == "dense" else None  # allgather's lazy state is sparse
        hierarchical = compression.options.get("hierarchical", False) if not (lazy is not None or bits) else False
        if lazy is not None or bits or hierarchical is not False:
            result, stats = await group.reduce_gradient(array, "dense", lazy=lazy, quantize_bits=bits, step=step,
                                                        seed=seed, hierarchical=hierarchical)
            total = to_tensor(result.values, grad)
        else:
            tried = None  # a float16 attempt whose mean overflowed: its bytes count too
            if compression.dense_fp16 and outgoing.dtype == torch.float32:
                tried, fitted = await mean_in_fp16(group, outgoing, grad)
                if fitted:
                    memory.forget()
                    return tried
            in_place = isinstance(array, np.ndarray) and outgoing.device.type == "cpu"
            total, stats = await group.allreduce(array, out=array if in_place else None)
            total = to_tensor(total, grad)
            if tried is not None:
                tried += stats
                stats = tried
        torch.div(total.view_as(grad), group.size, out=grad)
        memory.forget()
        return stats
    algorithm_seed = seed + 7919 * step if compression.algorithm in ("sketch", "auto") else seed
    options = dict(compression.options)
    if compression.quantize_bits:
        options["quantize_bits"] = compression.quantize_bits
    if lazy is not None:  # allgather (or "auto", which then picks among those that take it)
        options["lazy"] = lazy
    if algorithm_state is not None:
        options["state"] = algorithm_state
    with preselected(array, k, *selection) if selection is not None else nullcontext():
        result, stats = await group.reduce_gradient(array, compression.algorithm, density=density, step=step,
                                                    seed=algorithm_seed, **options)
    values = to_tensor(result.values, grad).to(grad.dtype)
    if result.indices is None:
        grad.copy_(values.view_as(grad)).div_(group.size)
    else:
        mean = values / group.size  # a new k-sized tensor: the values may view the buffer cleared next
        if source is not grad and previous is not None:
            grad.index_fill_(0, previous, 0)  # the buffer is zero elsewhere: nothing wrote it since
        elif source is not grad or outgoing is grad:  # else the pass zeroed it
            grad.zero_()
        indices = to_tensor(result.indices, grad).long()
        grad.index_copy_(0, indices, mean)
        memory.update_indices = indices
        memory.result_version = grad._version
    memory.settle(result, memory_beta)
    if not compression.error_feedback:
        memory.forget()
    return stats


async def mean_in_fp16(group: Group, outgoing: torch.Tensor, grad: torch.Tensor) -> tuple[CommStats, bool]:
    """``grad`` = the mean over ranks of float32 ``outgoing``, reduced as float16 (torch's
    ``fp16_compress_hook``): each rank divides by P while casting, so a sum stays in float16's
    range where the gradients do. Returns the call's statistics and whether the mean fitted.
    The reduced buffer is the same on every rank, so when it holds an inf (a mean past 65504)
    every rank sees it, leaves ``grad`` as it was and returns False: the caller then reduces
    ``outgoing``, which this attempt did not touch, in float32."""
    half = torch.empty(outgoing.shape, dtype=torch.float16, device=outgoing.device)
    torch.div(outgoing, group.size, out=half)
    reduced = as_array(half)
    _, stats = await group.allreduce(reduced, out=reduced)
    if not all_finite(half):
        return stats, False
    grad.copy_(half.view_as(grad))
    return stats, True


def local_topk(compression: Compression, group: Group, size: int, density: float, step: int) -> int:
    """The k of the top-k this rank's collective selects from its own buffer (0: none), so that
    the fused pass can find it: gTop-k and "auto" (which may pick it), the top-k allgather, and
    CLT-k on the step's leader."""
    name, options = compression.algorithm, compression.options
    topk_allgather = name == "allgather" and str(options.get("selection", "topk")).startswith("topk")
    selects = (name in ("gtopk", "auto") or (topk_allgather and "k" not in options)
               or (name == "cltk" and group.rank == step % group.size))
    return resolve_k(size, None, density) if selects and size else 0


async def check_layout(group: Group, signature: np.ndarray, what: str = "parameters") -> None:
    """Raise CollectiveMismatchError on every rank when the ranks' layouts differ."""
    gathered, _ = await group.allgather(signature)
    rows = np.asarray(gathered).reshape(group.size, -1)
    differing = [rank for rank in range(group.size) if not np.array_equal(rows[rank], rows[0])]
    if differing:
        counts = ", ".join(f"rank {rank}: {int(rows[rank][0])}" for rank in range(group.size))
        error = CollectiveMismatchError(
            f"{what} differ across ranks (ranks {differing} disagree with rank 0 on count, shapes or "
            f"dtypes; counts {counts}): build the model and optimizer identically on every rank",
            rank=group.rank)
        group.poison(error)  # a rank still inside the allgather raises the same error, not an abort
        raise error


async def any_rank_flags(group: Group, *flags: bool) -> tuple[bool, ...] | bool:
    """Each flag OR-ed over the ranks, the same on every rank (one tiny allreduce); a single flag
    comes back as a bool, several as a tuple."""
    total, _ = await group.allreduce(np.array([1.0 if flag else 0.0 for flag in flags], np.float32), op="max")
    agreed = tuple(bool(value > 0) for value in total)
    return agreed[0] if len(agreed) == 1 else agreed


def all_finite(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` holds no NaN or inf: one pass, no tensor-sized allocation. The min and
    max carry any NaN (max propagates it) or inf; a float64 sum was 15x slower on the CPU, and
    ``isfinite().all()`` allocates a mask as large as the tensor."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(float(low)) and math.isfinite(float(high))
