"""Every ``sparsecoll-bench`` argument checked before any rank starts.

Each check raises :class:`~sparsecoll.errors.InvalidArgumentError` naming the option and what
it accepts, so the command prints one line and exits non-zero within the time of an import,
instead of spawning ranks that fail seconds later (or hang).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from typing import Any

from sparsecoll.bench.common import parse_count, parse_list
from sparsecoll.errors import InvalidArgumentError

OPS = ("allreduce", "allgather", "broadcast", "barrier")
"""The dense ops ``collectives`` times (its module takes them from here)."""
QUANTIZE_BITS = (1, 2, 4, 8)
DENSITY_SCHEDULES = ("fixed", "accordion", "accordion-dense")
"""What ``train --density-schedule`` takes (``train.density_schedule`` builds them)."""
BUILTIN_ALGORITHMS = ("dense", "allgather", "gtopk", "sketch", "cltk", "oktopk")
"""What ``reduce_gradient`` knows without a registration (the cost model's ALGORITHMS)."""


def positive(option: str, value: int, *, least: int = 1) -> int:
    """``value`` if it is at least ``least``."""
    if value < least:
        raise InvalidArgumentError(f"{option} must be at least {least}, not {value}")
    return value


def listed(option: str, text: str, parse: Callable[[str], Any] = str) -> list[Any]:
    """A comma-separated list, each item parsed; at least one item."""
    try:
        items = parse_list(text, parse)
    except ValueError as error:
        raise InvalidArgumentError(f"{option}: {error}") from None
    if not items:
        raise InvalidArgumentError(f"{option} needs at least one value, got {text!r}")
    return items


def densities(option: str, text: str) -> list[float]:
    """Fractions in (0, 1]: '0.01,0.001'."""
    values = listed(option, text, _float)
    for value in values:
        if not 0 < value <= 1:
            raise InvalidArgumentError(f"{option} takes fractions in (0, 1], e.g. 0.01 for 1%; not {value:g}")
    return values


def memory_betas(option: str, text: str | None) -> list[float | None]:
    """ScaleCom's memory filter factors in (0, 1]: '1,0.1'; None (not given) is the algorithm's default."""
    if text is None:
        return [None]
    values = listed(option, text, _float)
    for value in values:
        if not 0 < value <= 1:
            raise InvalidArgumentError(f"{option} takes factors in (0, 1] (1 is plain error feedback, 0.1 "
                                       f"ScaleCom's default for cltk); not {value:g}")
    return values


def choices(option: str, text: str, allowed: Sequence[str]) -> list[str]:
    """Names from ``allowed``: 'fixed,accordion'."""
    values = listed(option, text)
    for value in values:
        if value not in allowed:
            raise InvalidArgumentError(f"{option} takes {', '.join(allowed)}; not {value!r}")
    return values


def positives(option: str, text: str) -> list[float]:
    """Positive finite numbers: '1,2'."""
    values = listed(option, text, _float)
    for value in values:
        if not 0 < value < float("inf"):
            raise InvalidArgumentError(f"{option} takes positive numbers, e.g. 1,2; not {value:g}")
    return values


def quantize_bits(option: str, text: str) -> list[int | None]:
    """Bits per value from QUANTIZE_BITS, 0 meaning not quantized."""
    values = listed(option, text, _int)
    for value in values:
        if value != 0 and value not in QUANTIZE_BITS:
            raise InvalidArgumentError(f"{option} takes 0 (not quantized) or {', '.join(map(str, QUANTIZE_BITS))}; "
                                       f"not {value}")
    return [value or None for value in values]


def algorithms(option: str, text: str, baselines: Sequence[str]) -> list[str]:
    """Builtin algorithms, the ``baselines`` this subcommand times, or registered names."""
    from sparsecoll import registry

    names = listed(option, text)
    known = [*baselines, *(n for n in BUILTIN_ALGORITHMS if n not in baselines)]
    unknown = [name for name in names if name not in known and name not in registry.collectives()
               and name not in registry.compressors()]
    if unknown:
        raise InvalidArgumentError(f"{option}: unknown {', '.join(map(repr, unknown))}; choose from "
                                   f"{', '.join(known)} or a name registered by an --import module")
    return names


def counts(option: str, text: str) -> list[int]:
    """Element counts like 1M,25M, each at least 1."""
    values = listed(option, text, parse_count)
    for value in values:
        positive(option, value)
    return values


def ranks_per_host(value: int, worlds: Sequence[int]) -> int:
    """L >= 1 that divides every rank count asked for (ignored under torchrun, which knows the hosts)."""
    positive("--ranks-per-host", value)
    uneven = [world for world in worlds if world % value]
    if uneven:
        raise InvalidArgumentError(f"--ranks-per-host {value} does not divide --ranks {', '.join(map(str, uneven))}")
    return value


def link(value: str | None) -> None:
    """A rate like 1gbit (and delay), and the root privileges namespaces need."""
    if value is None:
        return
    from sparsecoll.bench.netem import parse_link

    parse_link(value)
    if os.geteuid() != 0:
        raise InvalidArgumentError(f"--link {value} creates network namespaces and needs root")


def backend(value: str) -> str:
    from sparsecoll.bench.ranks import BACKENDS

    if value not in BACKENDS:
        raise InvalidArgumentError(f"--backend takes {' or '.join(BACKENDS)}, not {value!r}")
    if value == "ucx" and importlib.util.find_spec("ucxx") is None:
        raise InvalidArgumentError("--backend ucx needs ucxx: pip install 'sparsecoll[ucx]'")
    return value


def installed(module: str, what: str) -> None:
    """InvalidArgumentError naming the extra to install when ``module`` is missing."""
    if importlib.util.find_spec(module) is None:
        raise InvalidArgumentError(f"{what} needs {module}: pip install 'sparsecoll[examples]'")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"not an integer: {text!r}") from None
