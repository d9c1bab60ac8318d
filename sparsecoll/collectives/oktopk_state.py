"""What Ok-Topk keeps between steps, and the local arithmetic of its thresholds and regions.

Ok-Topk (Li & Hoefler, PPoPP 2022) estimates three things only every ``interval`` steps (the
authors' code: 32 for the thresholds, 64 for the regions; here one interval for all):

- the *local threshold*: this rank selects ``|g| > t_local`` in one pass instead of a top-k;
- the *region boundaries*: the index space cut into P contiguous regions, one per owner,
  holding about the same number of the ranks' selected entries;
- the *global threshold*: each owner keeps the entries of its region's sum above it.

Between estimations the thresholds follow the counts, as the authors' code does: a local
count below 3k/4 lowers ``t_local`` by 1.2%, a global count below 3k/4 lowers ``t_global`` by
1%. Two differences, both to keep the paper's byte bound with any input: a local count above k
is cut to its exact top k (a partial sort of the selected entries only) and ``t_local`` set to
the k-th magnitude; and a global count above 5k/4 is cut exactly by the same two-level
histogram that estimates ``t_global`` (the authors multiply ``t_global`` by 1.008 and send the
surplus). The authors estimate ``t_global`` by gathering every owner's whole region sum (up to
P·k pairs a rank); here two allreduces of 256 counts find it to 0.4% relative precision.

All histograms count float32 magnitudes by their bit patterns (for non-negative floats the
order of the bits is the order of the values), so every rank computes the same threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsecoll.errors import InvalidArgumentError

DEFAULT_INTERVAL = 32
"""Steps between estimations (the authors' threshold interval)."""
LOCAL_LOWER = 1.012
"""Factor by which a local threshold that selected fewer than 3k/4 entries is lowered (authors')."""
GLOBAL_LOWER = 1.01
"""Factor by which a global threshold that kept fewer than 3k/4 entries is lowered (authors')."""
GLOBAL_SLACK = 1.25
"""A global count above this many times k is cut back to about k (the authors' 5k/4 band)."""
LEVEL_BITS = 8
"""Bits of the float32 magnitude each histogram level resolves: 256 bins a level, so the first
level is the exponent and the second the top 8 bits of the mantissa (0.4% relative)."""
LEVEL1_SHIFT = 31 - LEVEL_BITS
LEVEL2_SHIFT = LEVEL1_SHIFT - LEVEL_BITS
INDEX_BINS = 4096
"""Most bins of the index histogram that places the region boundaries."""
MIN_INDEX_BINS = 64


@dataclass
class OkTopkState:
    """Ok-Topk's thresholds and regions for one gradient (or bucket); keep one per bucket and pass
    it to every call (``reduce_gradient(..., "oktopk", state=state)``).

    Every rank's state advances alike, so all ranks estimate on the same calls: a rank whose
    state differs (a fresh one beside used ones) makes the call fail with
    CollectiveMismatchError on every rank. ``interval`` is the hyperparameter; the rest is
    memory, saved by :meth:`state_dict`.
    """

    interval: int = DEFAULT_INTERVAL
    local_threshold: float | None = None
    global_threshold: float | None = None
    boundaries: np.ndarray | None = None
    """P+1 offsets: region r is ``[boundaries[r], boundaries[r+1])``, owned by rank r."""
    shape: tuple[int, int, int] | None = None
    """(d, k, P) the memory was estimated for; another shape estimates afresh."""
    age: int = 0
    """Calls since the last estimation."""
    estimations: int = 0
    global_cuts: int = 0
    """Calls whose global count exceeded 5k/4 and was cut back."""

    def fresh(self) -> OkTopkState:
        """A new state with this one's interval and no memory (one per bucket)."""
        return OkTopkState(interval=self.interval)

    def validate(self) -> None:
        """InvalidArgumentError for an interval that cannot work."""
        if isinstance(self.interval, bool) or not isinstance(self.interval, (int, np.integer)) \
                or self.interval < 1:
            raise InvalidArgumentError(f"Ok-Topk's interval must be an integer >= 1, not {self.interval!r}")

    def needs_estimate(self, shape: tuple[int, int, int]) -> bool:
        """Whether this call estimates thresholds and regions (else it reuses them)."""
        return (self.shape != shape or self.local_threshold is None or self.global_threshold is None
                or self.boundaries is None or self.age >= self.interval)

    def state_dict(self) -> dict:
        """Everything needed to resume exactly (arrays copied)."""
        return {name: value.copy() if isinstance(value, np.ndarray) else value for name, value in vars(self).items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        for name, value in state.items():
            setattr(self, name, value.copy() if isinstance(value, np.ndarray) else value)


def magnitudes(values: np.ndarray) -> np.ndarray:
    """|values| as float32 (the thresholds' precision, the same on every rank)."""
    return np.abs(np.asarray(values).astype(np.float32))


def magnitude_keys(values: np.ndarray) -> np.ndarray:
    """Order-preserving uint32 keys of |values| as float32."""
    return magnitudes(values).view(np.uint32)


def level1_histogram(keys: np.ndarray) -> np.ndarray:
    """Counts of the nonzero keys by their top bits (1024 bins, int64)."""
    keys = keys[keys > 0]
    return np.bincount(keys >> LEVEL1_SHIFT, minlength=1 << LEVEL_BITS).astype(np.int64)


def level2_histogram(keys: np.ndarray, bin1: int) -> np.ndarray:
    """Counts of the keys in level-1 bin ``bin1`` by their next bits."""
    inside = keys[(keys >> LEVEL1_SHIFT) == bin1]
    return np.bincount((inside >> LEVEL2_SHIFT) & ((1 << LEVEL_BITS) - 1),
                       minlength=1 << LEVEL_BITS).astype(np.int64)


def crossing_bin(histogram: np.ndarray, wanted: int) -> tuple[int, int]:
    """The highest bin b with at least ``wanted`` keys in bins >= b, and the count above b."""
    at_least = np.cumsum(histogram[::-1])[::-1]
    bin_index = int(np.flatnonzero(at_least >= wanted)[-1])
    above = int(at_least[bin_index + 1]) if bin_index + 1 < histogram.size else 0
    return bin_index, above


def threshold_below_key(key: int) -> float:
    """The float32 t with ``|x| > t`` exactly for keys >= ``key`` (0 when ``key`` is 0)."""
    if key <= 0:
        return 0.0
    return float(np.array([key - 1], np.uint32).view(np.float32)[0])


def index_boundaries(histogram: np.ndarray, size: int, ranks: int) -> np.ndarray:
    """P+1 region offsets that split the summed index histogram into near-equal counts.

    Bin ``b`` covers indices ``[b·w, (b+1)·w)``; boundary j ends the bin where the running count
    first reaches j/P of the total. With no entries at all the regions are equal slices.
    """
    width = -(-size // histogram.size) if size else 1
    total = int(histogram.sum())
    bounds = np.zeros(ranks + 1, np.int64)
    bounds[-1] = size
    if total == 0:
        base, extra = divmod(size, ranks)
        bounds[1:] = np.cumsum([base + (1 if r < extra else 0) for r in range(ranks)])
        return bounds
    running = np.cumsum(histogram)
    for j in range(1, ranks):
        bin_index = int(np.searchsorted(running, j * total / ranks, side="left"))
        bounds[j] = min(size, (bin_index + 1) * width)
    return bounds


def index_bins(size: int, count: int) -> int:
    """Bins of the index histogram: about k (a bin then holds about P selected entries), at
    least :data:`MIN_INDEX_BINS` and at most :data:`INDEX_BINS` or d."""
    return max(1, min(INDEX_BINS, size, max(MIN_INDEX_BINS, count)))


def index_histogram(indices: np.ndarray, size: int, bins: int) -> np.ndarray:
    """Counts of ``indices`` in ``bins`` equal bins of the index space."""
    width = -(-size // bins) if size else 1
    return np.bincount(np.asarray(indices, np.int64) // width, minlength=bins).astype(np.int64)
