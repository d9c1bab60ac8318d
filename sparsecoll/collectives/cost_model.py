"""An α-β cost model of every builtin algorithm, so ``algorithm="auto"`` can pick the fastest.

A message of ``n`` bytes costs ``alpha + (n + HEADER_SIZE) * beta`` seconds (per-message latency
plus inverse bandwidth of a rank's link); local work costs a measured time per element
(top-k selection, count-sketch insert and recovery, dense add, sparse merge, quantization). ``predict``
follows each algorithm's critical path message by message (see the modules of
:mod:`sparsecoll.collectives`); ``choose`` is its argmin. Parameters come from
``sparsecoll-bench calibrate`` (saved as a small JSON file) or, without one, from
:data:`DEFAULT_MODEL`: a 10 Gbit/s link with 50 µs per message and the kernels' speed on one
typical core. Per-element costs are taken as measured: when ranks share cores they are larger,
and the calibration, run with the job's ranks, sees exactly that; to predict ranks sharing cores
from one core's costs, :class:`~sparsecoll.collectives.cost_contention.SharedCores` scales a model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsecoll.collectives.cost_bytes import (
    SKETCH_ROWS,
    TWO_LEVEL_ALGORITHMS,
    Shards,
    check_two_level,
    two_level_result_count,
)
from sparsecoll.collectives.dense import SEGMENT_BYTES, SMALL_ALLREDUCE_BYTES
from sparsecoll.collectives.doubling import DoublingPlan
from sparsecoll.collectives.oktopk_state import DEFAULT_INTERVAL, LEVEL_BITS, index_bins
from sparsecoll.collectives.quantized_ring import quantized_bytes
from sparsecoll.collectives.sketch import default_columns
from sparsecoll.errors import InvalidArgumentError
from sparsecoll.wire import HEADER_SIZE, index_dtype, sparse_payload_size

ALGORITHMS = ("dense", "allgather", "gtopk", "sketch", "cltk", "oktopk")
"""What the model can price, in the order that breaks ties."""
QUANTIZE_BITS = (1, 2, 4, 8)
"""``quantize_bits`` every algorithm takes (dense, CLT-k and sketch through the quantized ring)."""
PARAMETERS = ("alpha", "beta", "select_per_element", "select_fixed", "lone_select_ratio",
              "sketch_per_element", "reduce_per_element", "merge_per_pair", "quantize_per_element")
"""The model's numbers, in the order of :meth:`CostModel.to_array`."""
FORMAT_VERSION = 1
ENV_PATH = "SPARSECOLL_COST_MODEL"


@dataclass(frozen=True)
class CostModel:
    """α-β parameters (seconds, seconds per byte) and local costs (seconds per element), with
    where and when they were measured.

    Selection costs are for every rank selecting at once (allgather, gtopk); CLT-k's leader
    selects alone, which takes ``lone_select_ratio`` of that (1 with a core per rank, about
    cores/ranks when ranks share cores).
    """

    alpha: float = 50e-6
    beta: float = 8e-10
    select_per_element: float = 1e-9
    select_fixed: float = 0.0
    lone_select_ratio: float = 1.0
    sketch_per_element: float = 2e-8
    reduce_per_element: float = 3e-10
    merge_per_pair: float = 2e-8
    quantize_per_element: float = 1e-8
    date: str = ""
    host: str = ""
    ranks: int = 0
    link: str = "default: 10 Gbit/s, 50 us a message, one core per rank"

    def __post_init__(self) -> None:
        for name in PARAMETERS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise InvalidArgumentError(f"cost model parameter {name} must be a finite number >= 0, "
                                           f"not {value!r}")
        if isinstance(self.ranks, bool) or not isinstance(self.ranks, int) or self.ranks < 0:
            raise InvalidArgumentError(f"cost model ranks must be an int >= 0, not {self.ranks!r}")
        for name in ("date", "host", "link"):
            if not isinstance(getattr(self, name), str):
                raise InvalidArgumentError(f"cost model {name} must be a string")

    # ------------------------------------------------------------------ prediction
    def message(self, nbytes: float) -> float:
        """Seconds to send one frame with ``nbytes`` of payload to one peer."""
        return self.alpha + (nbytes + HEADER_SIZE) * self.beta

    def select(self, size: int) -> float:
        """Seconds of one local top-k selection over ``size`` elements."""
        return self.select_fixed + self.select_per_element * size

    def ring_allreduce(self, ranks: int, count: int, itemsize: int = 4, bits: int | None = None) -> float:
        """Reduce-scatter then allgather: 2(P-1) steps of count/P values, (P-1)/P·count adds;
        with ``bits`` every step's values are rounded by the sender and decoded by the receiver."""
        if ranks == 1:
            return 0.0
        steps, chunk = 2 * (ranks - 1), count / ranks
        adds = (ranks - 1) * chunk * self.reduce_per_element
        if bits is None:
            return steps * self.message(chunk * itemsize) + adds
        return steps * (self.message(quantized_bytes(math.ceil(chunk), bits)) + chunk * self.quantize_per_element) + adds

    def doubling_allreduce(self, ranks: int, count: int, itemsize: int = 4) -> float:
        """Recursive doubling: log2 p exchanges of everything (+ a fold in and out when P != p)."""
        plan = DoublingPlan(0, ranks)
        rounds, folded = plan.rounds, plan.extra > 0
        return (rounds + 2 * folded) * self.message(count * itemsize) \
            + (rounds + folded) * count * self.reduce_per_element

    def chain_broadcast(self, ranks: int, nbytes: int) -> float:
        """Segments pipelined along P-1 hops."""
        if ranks == 1:
            return 0.0
        segments = max(1, -(-nbytes // SEGMENT_BYTES))
        return (ranks - 2 + segments) * self.message(nbytes / segments)

    def predict(self, algorithm: str, ranks: int, size: int, k: int, quantize_bits: int | None = None,
                *, itemsize: int = 4) -> float:
        """Seconds one call of ``algorithm`` takes on ``ranks`` ranks for a ``size``-element
        gradient of which ``k`` elements are sent (the slowest rank's critical path)."""
        _check_call(ranks, size, k)
        if algorithm not in ALGORITHMS:
            raise InvalidArgumentError(f"the cost model knows {ALGORITHMS}, not {algorithm!r}")
        bits = quantize_bits
        if bits is not None and bits not in QUANTIZE_BITS:
            raise InvalidArgumentError(f"quantize_bits must be one of {QUANTIZE_BITS}, not {bits!r}")
        if algorithm == "dense":
            if bits is None and size * itemsize <= SMALL_ALLREDUCE_BYTES:
                return self.doubling_allreduce(ranks, size, itemsize)
            return self.ring_allreduce(ranks, size, itemsize, bits)
        if algorithm == "sketch":
            table = SKETCH_ROWS * default_columns(k)
            candidates = min(size, 4 * k)
            return self.sketch_per_element * size * SKETCH_ROWS + self.ring_allreduce(ranks, table, 4, bits) \
                + self.ring_allreduce(ranks, candidates, itemsize, bits) + candidates * self.merge_per_pair
        if algorithm == "cltk":
            indices = k * index_dtype(size).itemsize
            return self.lone_select_ratio * self.select(size) + self.chain_broadcast(ranks, indices) \
                + self.ring_allreduce(ranks, k, itemsize, bits)
        if algorithm == "oktopk":
            return self.oktopk(ranks, size, k, itemsize, bits)
        payload = sparse_payload_size(k, size, np.dtype(f"f{itemsize}"), bits)
        exchange = self.message(payload) + (0.0 if bits is None else k * self.quantize_per_element)
        if algorithm == "allgather":
            return self.select(size) + (ranks - 1) * exchange + ranks * k * self.merge_per_pair
        plan = DoublingPlan(0, ranks)  # gtopk: recursive doubling of k pairs, a merge each round
        rounds, folded = plan.rounds, plan.extra > 0
        return self.select(size) + (rounds + 2 * folded) * exchange + (rounds + folded) * 2 * k * self.merge_per_pair

    def oktopk(self, ranks: int, size: int, k: int, itemsize: int = 4, bits: int | None = None) -> float:
        """Ok-Topk at its paper's bound: a one-pass threshold selection; P-1 split messages of
        k/P pairs (values at ``bits``, if given); a counts allreduce; a balance of at most
        k(P-1)/P pairs; a ring of P-1 blocks of k/P pairs: 3k(P-1)/P pairs, the paper's
        6k(P-1)/P numbers. Every
        :data:`~.oktopk_state.DEFAULT_INTERVAL` calls an estimation adds an exact selection and
        three histogram allreduces (its share is added)."""
        dtype = np.dtype(f"f{itemsize}")
        share = k / ranks
        if ranks == 1:
            return self.select(size)
        block = self.message(sparse_payload_size(math.ceil(share), size, dtype, None))
        split = self.message(sparse_payload_size(math.ceil(share), size, dtype, bits))
        if bits is not None:
            split += share * self.quantize_per_element
        balance = self.message(sparse_payload_size(math.ceil(share * (ranks - 1)), size, dtype, None))
        steady = self.select(size) + (ranks - 1) * (split + block) + balance \
            + self.doubling_allreduce(ranks, ranks, 8) + k * self.merge_per_pair
        estimation = self.select(size) + self.doubling_allreduce(ranks, index_bins(size, k), 8) \
            + 2 * self.doubling_allreduce(ranks, 1 << LEVEL_BITS, 8)
        return steady + estimation / DEFAULT_INTERVAL

    def predict_two_level(self, algorithm: str, hosts: int, per_host: int, size: int, k: int, *,
                          intra: CostModel | None = None, itemsize: int = 4) -> float:
        """Seconds of one two-level call (:mod:`sparsecoll.collectives.hierarchical`) on ``hosts``
        hosts of ``per_host`` ranks: this model's link between hosts, ``intra``'s α and β inside
        a host (default: this model's), this model's local costs. The slowest rank owns the
        largest shard (length d/L, k/L entries); each step waits for the one before:

        1. Reduce-scatter inside the host: L-1 messages a rank (dense and CLT-k: a shard, then
           its L-1 adds; allgather and gTop-k: a top-k selection over d first, then k/L pairs,
           then merging L parts of k/L pairs).
        2. Between hosts: the flat algorithm on H ranks over the shard (:meth:`predict`); the L
           collectives run at once, one a local rank, each on its own rank's link.
        3. Allgather inside the host: L-1 messages of the shard's result (and its host mask).

        One host, or one rank a host, is the flat algorithm, as at run time.
        """
        check_two_level(algorithm, hosts, per_host)
        local = intra or self
        if hosts == 1:
            return local.predict(algorithm, per_host, size, k, itemsize=itemsize)
        if per_host == 1:
            return self.predict(algorithm, hosts, size, k, itemsize=itemsize)
        _check_call(hosts * per_host, size, k)
        shards = Shards.of(per_host, size, k)
        length, count = shards.lengths[0], max(1, shards.counts[0])
        others = per_host - 1
        dtype = np.dtype(f"f{itemsize}")
        if algorithm in ("dense", "cltk"):
            scatter = others * (local.message(length * itemsize) + length * self.reduce_per_element)
        else:
            scatter = self.select(size) + others * local.message(sparse_payload_size(count, length, dtype, None)) \
                + per_host * count * self.merge_per_pair
        between = self.predict(algorithm, hosts, length, min(count, length), itemsize=itemsize)
        if algorithm == "dense":
            result_bytes = length * itemsize
        else:
            result = two_level_result_count(algorithm, hosts, length, count)
            result_bytes = sparse_payload_size(result, length, dtype, None) + (result + 7) // 8
        return scatter + between + others * local.message(result_bytes)

    def price(self, algorithm: str, ranks: int, size: int, k: int, quantize_bits: int | None = None, *,
              itemsize: int = 4, two_level: tuple[int, int] | None = None, intra: CostModel | None = None) -> float:
        """What a call costs as it will run: two-level on ``two_level`` = (hosts, ranks a host)
        where the algorithm runs so (unquantized :data:`TWO_LEVEL_ALGORITHMS`), else flat."""
        if two_level is not None and algorithm in TWO_LEVEL_ALGORITHMS and quantize_bits is None:
            return self.predict_two_level(algorithm, *two_level, size, k, intra=intra, itemsize=itemsize)
        return self.predict(algorithm, ranks, size, k, quantize_bits, itemsize=itemsize)

    def choose(self, ranks: int, size: int, k: int, candidates: Sequence[str] = ALGORITHMS,
               quantize_bits: int | None = None, *, itemsize: int = 4,
               two_level: tuple[int, int] | None = None, intra: CostModel | None = None) -> str:
        """The candidate with the smallest predicted time (ties go to the earlier candidate);
        with ``two_level`` = (hosts, ranks a host), those that run two-level are priced so
        (with ``intra``'s link inside a host, default this model's)."""
        if not candidates:
            raise InvalidArgumentError("choose needs at least one candidate algorithm")
        costs = [self.price(name, ranks, size, k, quantize_bits, itemsize=itemsize, two_level=two_level,
                            intra=intra) for name in candidates]
        return candidates[int(np.argmin(costs))]

    # ------------------------------------------------------------------ persistence
    def to_array(self) -> np.ndarray:
        """The parameters as float64, in :data:`PARAMETERS` order (what ranks broadcast)."""
        return np.array([getattr(self, name) for name in PARAMETERS], np.float64)

    @classmethod
    def from_array(cls, values: np.ndarray, **provenance: object) -> CostModel:
        """The model :meth:`to_array` described; InvalidArgumentError for a wrong shape or value."""
        values = np.asarray(values, np.float64).reshape(-1)
        if values.size != len(PARAMETERS):
            raise InvalidArgumentError(f"a cost model has {len(PARAMETERS)} parameters, not {values.size}")
        return cls(**{name: float(value) for name, value in zip(PARAMETERS, values)}, **provenance)

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the model as JSON (default: :func:`default_path`); returns the path."""
        target = Path(path) if path is not None else default_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        document = {"version": FORMAT_VERSION, **dataclasses.asdict(self)}
        scratch = target.with_name(target.name + ".tmp")
        scratch.write_text(json.dumps(document, indent=2) + "\n")
        scratch.replace(target)  # readers never see half a file
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> CostModel:
        """Read a model :meth:`save` wrote; InvalidArgumentError naming the file if it is malformed."""
        try:
            document = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InvalidArgumentError(f"cannot read cost model {path}: {error}") from error
        if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
            raise InvalidArgumentError(f"cost model {path} is not a version-{FORMAT_VERSION} JSON object")
        fields = {field.name for field in dataclasses.fields(cls)}
        missing = [name for name in PARAMETERS if name not in document]
        unknown = sorted(set(document) - fields - {"version"})
        if missing or unknown:
            raise InvalidArgumentError(f"cost model {path}: missing {missing}, unknown {unknown}")
        try:
            return cls(**{name: document[name] for name in fields if name in document})
        except InvalidArgumentError as error:
            raise InvalidArgumentError(f"cost model {path}: {error.message}") from error


DEFAULT_MODEL = CostModel()
"""No calibration file: 10 Gbit/s (β = 0.8 ns/B), α = 50 µs, top-k 1 ns/element, sketch
20 ns/element·row, dense add 0.3 ns/element, merge 20 ns/pair, quantize and decode 10 ns/value."""


def default_path() -> Path:
    """``$SPARSECOLL_COST_MODEL``, else ``$XDG_CACHE_HOME/sparsecoll/cost_model.json`` (``~/.cache``)."""
    if os.environ.get(ENV_PATH):
        return Path(os.environ[ENV_PATH]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "sparsecoll" / "cost_model.json"


def load_default() -> CostModel:
    """The model at :func:`default_path`, or :data:`DEFAULT_MODEL` when there is no file there."""
    path = default_path()
    return CostModel.load(path) if path.exists() else DEFAULT_MODEL


def _check_call(ranks: int, size: int, k: int) -> None:
    if ranks < 1 or size < 1 or not 1 <= k <= size:
        raise InvalidArgumentError(f"need ranks >= 1, size >= 1 and 1 <= k <= size; got {ranks}, {size}, {k}")


AUTO_GAP_COLUMNS = [("ranks", "P"), ("d", "d"), ("k", "k"), ("pick", "auto pick"),
                    ("predicted_ms", "predicted (ms)"), ("pick_ms", "pick (ms)"), ("best", "best"),
                    ("best_ms", "best (ms)"), ("gap_pct", "gap %")]


def auto_gap(rows: Iterable[dict], model: CostModel) -> list[dict]:
    """Per (ranks, d, k) of sparse-bench rows: the model's pick among the measured algorithms, its
    measured time, the fastest measured algorithm, and how much slower the pick was (%)."""
    measured: dict[tuple[int, int, int], dict[str, float]] = {}
    for row in rows:
        if row["algorithm"] in ALGORITHMS:
            key = (int(row["ranks"]), int(row["d"]), int(row["k"]))
            measured.setdefault(key, {})[row["algorithm"]] = float(row["time_ms"])
    report = []
    for (ranks, size, k), times in measured.items():
        candidates = [name for name in ALGORITHMS if name in times]
        pick = model.choose(ranks, size, k, candidates)
        best = min(candidates, key=times.__getitem__)
        report.append({"ranks": ranks, "d": size, "k": k, "pick": pick,
                       "predicted_ms": model.predict(pick, ranks, size, k) * 1e3, "pick_ms": times[pick],
                       "best": best, "best_ms": times[best],
                       "gap_pct": 100.0 * (times[pick] / times[best] - 1.0)})
    return report
