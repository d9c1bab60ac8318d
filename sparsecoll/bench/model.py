"""``sparsecoll-bench model``: the calibrated α-β cost model's time and bytes per rank for every
algorithm over a range of rank counts, flat and two-level, where one overtakes another, and how
far it is from points measured by ``sparsecoll-bench sparse --json``.

The prices are the ones ``algorithm="auto"`` uses (:meth:`CostModel.price`, bytes from
:mod:`sparsecoll.collectives.cost_bytes`): nothing is re-derived here. Ranks sit in hosts of L
(``--ranks-per-host``); a job of P <= L ranks is one host. A flat algorithm across several
hosts is priced with every message on the link between hosts (exact for the ring algorithms,
whose slowest hop sets each step; an upper bound for gTop-k and Ok-Topk, whose rounds inside a
host would go faster); on one host, with the link inside it. With :class:`Cores`, ranks share
their host's cores (or every rank one machine's): see
:class:`~sparsecoll.collectives.cost_contention.SharedCores`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsecoll.bench.table import Column, count, integer, nbytes, seconds
from sparsecoll.collectives.cost_bytes import TWO_LEVEL_ALGORITHMS, bytes_sent, two_level_bytes
from sparsecoll.collectives.cost_contention import BYTE_CPU, MESSAGE_CPU, SharedCores
from sparsecoll.collectives.cost_model import ALGORITHMS, CostModel
from sparsecoll.errors import InvalidArgumentError

INTRA_LINK = "100gbit"
INTRA_ALPHA = 5e-6
"""Default link inside a host: 100 Gbit/s and 5 us a message, a shared-memory or NVLink-class
path far faster than the network between hosts (override with --intra-link/--intra-alpha)."""
MAX_RANKS = 1 << 20


@dataclass(frozen=True)
class Cores:
    """Hosts of ``per_host`` cores that their ranks share (default in :class:`Links`: none, a core
    or GPU a rank). ``one_machine``: every rank of the job runs on one such host whatever the
    hosts of its links (``sparsecoll-bench sparse`` over emulated links on one VM); else a host's
    ranks share its cores. A message and a byte cost a rank ``message_cpu`` and ``byte_cpu``
    (default: fitted on this repository's VM, see :mod:`~sparsecoll.collectives.cost_contention`)."""

    per_host: int
    one_machine: bool = False
    message_cpu: float = MESSAGE_CPU
    byte_cpu: float = BYTE_CPU

    def sharing(self, ranks: int, local: int) -> SharedCores:
        """The cores of a job of ``ranks`` ranks, ``local`` of them a host."""
        return SharedCores(ranks if self.one_machine else local, self.per_host, self.message_cpu, self.byte_cpu)


@dataclass(frozen=True)
class Links:
    """The model between hosts (α, β and the local kernel costs) and the α-β inside a host, and
    the cores ranks share (None: a core or GPU a rank, local costs as the model has them)."""

    inter: CostModel
    intra: CostModel
    cores: Cores | None = None

    def at(self, ranks: int, local: int) -> tuple[CostModel, CostModel]:
        """(between hosts, inside a host) for a job of ``ranks`` ranks, ``local`` of them a host."""
        if self.cores is None:
            return self.inter, self.intra
        shared = self.cores.sharing(ranks, local)
        return shared.apply(self.inter), shared.apply(self.intra)

    def flat(self, hosts: int, ranks: int, local: int) -> CostModel:
        """The model a flat algorithm of ``ranks`` ranks on ``hosts`` hosts of ``local`` is priced
        with: the link inside the host when there is one host."""
        inter, intra = self.at(ranks, local)
        return intra if hosts == 1 else inter


def parse_ranks(text: str) -> list[int]:
    """'2..1024' (doubling from 2 up to 1024, which is included), '8' or '2,3,4,8'; every P >= 2."""
    text = text.strip()
    match = re.fullmatch(r"(\d+)\s*\.\.\s*(\d+)", text)
    if match:
        low, high = int(match.group(1)), int(match.group(2))
        if high < low:
            raise InvalidArgumentError(f"--ranks {text}: the range ends below its start")
        values = []
        value = low
        while 0 < value < high:
            values.append(value)
            value *= 2
        values.append(high)
    elif re.fullmatch(r"\d+(\s*,\s*\d+)*", text):
        values = sorted({int(part) for part in text.split(",")})
    else:
        raise InvalidArgumentError(f"--ranks {text!r} is not a range like 2..1024 or a list like 2,4,8")
    small = [value for value in values if value < 2]
    if small:
        raise InvalidArgumentError(f"--ranks needs at least 2 ranks (a model of {small[0]} rank has no messages)")
    if values[-1] > MAX_RANKS:
        raise InvalidArgumentError(f"--ranks goes up to {MAX_RANKS}, not {values[-1]}")
    return values


def layout(ranks: int, per_host: int) -> tuple[int, int]:
    """(hosts, ranks a host) of P ranks in hosts of L: one host when P <= L; InvalidArgumentError
    when L does not divide P (hosts of unequal size)."""
    if ranks <= per_host:
        return 1, ranks
    if ranks % per_host:
        raise InvalidArgumentError(f"--ranks-per-host {per_host} does not divide --ranks {ranks} "
                                   "(hosts would hold different numbers of ranks)")
    return ranks // per_host, per_host


def rate_beta(rate: str) -> float:
    """Seconds per byte of a link rate like 1gbit or 100mbit (tc's units, as --link takes them)."""
    from sparsecoll.bench.netem import parse_rate

    number, unit = re.fullmatch(r"([\d.]+)(k|m|g)?bit", parse_rate(rate)).groups()
    bits = float(number) * {None: 1, "k": 1e3, "m": 1e6, "g": 1e9}[unit]
    if bits <= 0:
        raise InvalidArgumentError(f"link rate {rate!r} must be above zero")
    return 8.0 / bits


def series_names(algorithms: Sequence[str], per_host: int) -> list[str]:
    """'gtopk' (flat) and 'gtopk 2-level' where it runs two-level and hosts hold several ranks."""
    names = []
    for algorithm in algorithms:
        names.append(algorithm)
        if per_host > 1 and algorithm in TWO_LEVEL_ALGORITHMS:
            names.append(f"{algorithm} 2-level")
    return names


def price(links: Links, series: str, ranks: int, per_host: int, size: int, k: int) -> dict[str, Any]:
    """One point of one series: seconds, mean bytes a rank sends, and of those, to other hosts."""
    algorithm, _, level = series.partition(" ")
    hosts, local = layout(ranks, per_host)
    if level:
        inter, intra = links.at(ranks, local)
        seconds_taken = inter.predict_two_level(algorithm, hosts, local, size, k, intra=intra)
        split = two_level_bytes(algorithm, hosts, local, size, k)
        return {"seconds": seconds_taken, "bytes": split.total, "inter_host_bytes": split.inter_host}
    sent = bytes_sent(algorithm, ranks, size, k)
    to_others = 0.0 if hosts == 1 else None  # flat across hosts: which messages leave the host is not modelled
    return {"seconds": links.flat(hosts, ranks, local).predict(algorithm, ranks, size, k), "bytes": sent,
            "inter_host_bytes": to_others}


def model_rows(links: Links, ranks: Sequence[int], per_host: int, size: int, k: int,
               algorithms: Sequence[str]) -> list[dict[str, Any]]:
    """Every (P, series) point, P-major."""
    rows = []
    for world in ranks:
        hosts, _ = layout(world, per_host)
        for series in series_names(algorithms, per_host):
            point = price(links, series, world, per_host, size, k)
            rows.append({"ranks": world, "hosts": hosts, "d": size, "k": k, "algorithm": series,
                         "time_ms": point["seconds"] * 1e3, "bytes_sent": point["bytes"],
                         "inter_host_bytes": point["inter_host_bytes"]})
    return rows


def wire_bytes(row: dict[str, Any]) -> float | None:
    """What a series' bytes column shows: to other hosts for two-level, every byte for flat."""
    return row["inter_host_bytes"] if row["algorithm"].endswith("2-level") else row["bytes_sent"]


def wide_rows(rows: list[dict], key: str) -> tuple[list[Column], list[dict]]:
    """One table row a P, one column a series: times ("time_ms", and the fastest series) or
    bytes ("bytes": see :func:`wire_bytes`) side by side."""
    names = list(dict.fromkeys(row["algorithm"] for row in rows))
    columns = [Column("ranks", "P", integer), Column("hosts", "hosts", integer)]
    render = (lambda value: seconds(value * 1e-3)) if key == "time_ms" else nbytes
    columns += [Column(name, name.replace(" 2-level", " 2L"), render) for name in names]
    table: dict[int, dict] = {}
    for row in rows:
        entry = table.setdefault(row["ranks"], {"ranks": row["ranks"], "hosts": row["hosts"]})
        entry[row["algorithm"]] = row["time_ms"] if key == "time_ms" else wire_bytes(row)
    if key == "time_ms":
        columns.append(Column("fastest", "fastest"))
        for entry in table.values():
            entry["fastest"] = min(names, key=lambda name: entry[name])
    return columns, list(table.values())


# ---------------------------------------------------------------------------- crossovers
def crossover(time_of: Callable[[str, int], float], first: str, second: str, low: int, high: int,
              per_host: int) -> int:
    """The smallest P in (low, high] (of those that fill hosts of ``per_host``) from which on
    ``second``'s order against ``first`` is the one it has at ``high``: the formulas' crossing."""
    def ahead(world: int) -> bool:
        return time_of(second, world) < time_of(first, world)

    target = ahead(high)
    grid = [world for world in range(low + 1, high + 1) if world <= per_host or world % per_host == 0]
    at = high
    for world in reversed(grid):
        if ahead(world) != target:
            break
        at = world
    return at


def _sign(value: float) -> int:
    return (value > 0) - (value < 0)


def crossovers(rows: list[dict], time_of: Callable[[str, int], float], per_host: int) -> list[dict[str, Any]]:
    """Every P where one series overtakes another between two neighbouring rank counts of the
    table: the series faster from there on, the one it passes, and the first P (on the grid of
    every rank count that fills hosts) from which it stays faster up to the table's next P.

    Not crossings of the formulas, so left out: a step from one host to several (the link
    changes under every series at once), and two-level series inside one host (they are the
    flat ones there)."""
    names = list(dict.fromkeys(row["algorithm"] for row in rows))
    times = {(row["algorithm"], row["ranks"]): row["time_ms"] for row in rows}
    ranks = sorted({row["ranks"] for row in rows})
    found = []
    for index, first in enumerate(names):
        for second in names[index + 1:]:
            two_level = first.endswith("2-level") or second.endswith("2-level")
            for low, high in zip(ranks[:-1], ranks[1:]):
                if low <= per_host < high or (high <= per_host and two_level):
                    continue
                before = _sign(times[second, low] - times[first, low])
                after = _sign(times[second, high] - times[first, high])
                if after != 0 and before != after:
                    faster, slower = (second, first) if after < 0 else (first, second)
                    found.append({"faster": faster, "overtakes": slower, "between": [low, high],
                                  "ranks": crossover(time_of, first, second, low, high, per_host)})
    return sorted(found, key=lambda item: (item["ranks"], item["faster"]))


# ---------------------------------------------------------------------------- measured points
def load_measured(path: str) -> list[dict[str, Any]]:
    """The rows of a ``sparsecoll-bench sparse --json`` document that the model prices."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidArgumentError(f"--measured {path}: {error}") from None
    if not isinstance(document, dict) or document.get("benchmark") not in ("sparse", "demo") \
            or not isinstance(document.get("rows"), list):
        raise InvalidArgumentError(f"--measured {path} is not a `sparsecoll-bench sparse --json` document")
    rows = []
    for row in document["rows"]:
        algorithm, _, level = str(row.get("algorithm", "")).partition(" ")
        if algorithm not in ALGORITHMS or level not in ("", "2-level"):
            continue  # gloo, selection, registered algorithms: not priced
        try:
            rows.append({"ranks": int(row["ranks"]), "d": int(row["d"]), "k": int(row["k"]),
                         "algorithm": row["algorithm"], "time_ms": float(row["time_ms"]),
                         "bytes_sent": row.get("bytes_sent"), "inter_host_bytes": row.get("inter_host_bytes"),
                         "ranks_per_host": int(row.get("ranks_per_host") or 1)})
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidArgumentError(f"--measured {path}: a row lacks {error}") from None
    if not rows:
        raise InvalidArgumentError(f"--measured {path} has no rows of {', '.join(ALGORITHMS)}")
    return rows


def compare(links: Links, measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each measured point beside the model's price at its own P, d, k and hosts."""
    compared = []
    for row in measured:
        point = price(links, row["algorithm"], row["ranks"], row["ranks_per_host"], row["d"], row["k"])
        two_level = row["algorithm"].endswith("2-level")
        wire = row["inter_host_bytes"] if two_level else row["bytes_sent"]
        model_wire = point["inter_host_bytes"] if two_level else point["bytes"]
        compared.append({**row, "model_ms": point["seconds"] * 1e3,
                         "time_ratio": point["seconds"] * 1e3 / row["time_ms"] if row["time_ms"] > 0 else None,
                         "measured_bytes": wire, "model_bytes": model_wire,
                         "bytes_ratio": model_wire / wire if wire else None})
    return compared


COMPARE_TABLE = [
    Column("ranks", "P", integer), Column("d", "d", count), Column("algorithm", "algorithm"),
    Column("time_ms", "measured", lambda value: seconds(value * 1e-3)),
    Column("model_ms", "model", lambda value: seconds(value * 1e-3)),
    Column("time_ratio", "model/measured", lambda value: f"{value:.2f}"),
    Column("measured_bytes", "wire B/rank", nbytes), Column("model_bytes", "model B/rank", nbytes),
    Column("bytes_ratio", "B model/measured", lambda value: f"{value:.3f}"),
]
"""Bytes are to other hosts for two-level rows, all bytes for flat ones; the model's are the
mean rank's, the sparse bench's rank 0's (the same for every rank but CLT-k, whose leader sends
the indices too, and recursive doubling at P not a power of two)."""


# ---------------------------------------------------------------------------- the plot
def plot(rows: list[dict], found: list[dict], measured: list[dict], title: str, path: str) -> Path:
    """Time and bytes per rank against P (log-log), one line a series, measured points as
    markers in their series' colour, crossovers as dotted verticals on the time panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(figure)
    times, wires = figure.subplots(1, 2)
    names = list(dict.fromkeys(row["algorithm"] for row in rows))
    for index, name in enumerate(names):
        colour = f"C{index % 10}"
        style = "--" if name.endswith("2-level") else "-"
        mine = [row for row in rows if row["algorithm"] == name]
        times.plot([row["ranks"] for row in mine], [row["time_ms"] for row in mine], style, color=colour,
                   label=name)
        sending = [row for row in mine if wire_bytes(row)]  # two-level on one host: nothing to other hosts
        wires.plot([row["ranks"] for row in sending], [wire_bytes(row) for row in sending], style, color=colour)
        points = [row for row in measured if row["algorithm"] == name]
        if points:
            times.plot([p["ranks"] for p in points], [p["time_ms"] for p in points], "o", color=colour,
                       markeredgecolor="black", label=f"{name} measured")
            wires.plot([p["ranks"] for p in points], [p["measured_bytes"] for p in points], "o", color=colour,
                       markeredgecolor="black")
    for item in found:
        times.axvline(item["ranks"], color="0.8", linestyle=":", linewidth=0.8)
    for axis, label in ((times, "time a call"), (wires, "bytes a rank sends (2-level: to other hosts)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("ranks P")
        axis.set_ylabel(label + (" (ms)" if axis is times else " (B)"))
        axis.grid(True, which="both", alpha=0.3)
    times.legend(fontsize=7, ncols=2)
    figure.suptitle(title.replace("; ", "\n"), fontsize=9)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=110, bbox_inches="tight")
    return target


def describe(model: CostModel) -> str:
    """α and bandwidth of a link in a few words."""
    rate = f"{8e-9 / model.beta:.3g} Gbit/s" if model.beta else "infinite bandwidth"
    return f"{rate}, {model.alpha * 1e6:.3g} us a message"


def with_local_costs(model: CostModel, source: CostModel) -> CostModel:
    """``model``'s link with ``source``'s local costs (and its provenance)."""
    from sparsecoll.collectives.cost_contention import LOCAL_COSTS

    return dataclasses.replace(model, **{name: getattr(source, name) for name in LOCAL_COSTS},
                               lone_select_ratio=source.lone_select_ratio, date=source.date, host=source.host)


def ratio_summary(compared: list[dict[str, Any]], band: float = 0.25) -> str:
    """How many measured points the model's time is within ``band`` of, and the extreme ratios."""
    ratios = [row["time_ratio"] for row in compared if row["time_ratio"] is not None]
    inside = sum(abs(ratio - 1.0) <= band for ratio in ratios)
    return (f"model/measured time: {inside} of {len(ratios)} points within {100 * band:g}%, "
            f"ratios {min(ratios):.2f} to {max(ratios):.2f}") if ratios else "no measured times"


def with_link(model: CostModel, alpha: float | None, beta: float | None, link: str) -> CostModel:
    """``model`` with α and β replaced where given, and ``link`` saying where they came from."""
    changes: dict[str, Any] = {"link": link}
    if alpha is not None:
        changes["alpha"] = alpha
    if beta is not None:
        changes["beta"] = beta
    return dataclasses.replace(model, **changes)
