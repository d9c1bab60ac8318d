"""Who talks to whom in recursive doubling, for any number of ranks.

With p = 2^floor(log2 P) and e = P - p, ranks 0..2e-1 pair up before the rounds: each even
one (*folded*) hands its data to its odd neighbour (a *host*) and waits for the result; the
hosts and the ranks from 2e on are the p *virtual* ranks 0..p-1 that run log2 p rounds, in
round r exchanging with the virtual rank at distance 2^r. Each host then sends the result
back to its folded neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DoublingPlan:
    """One rank's part in recursive doubling over ``size`` ranks."""

    rank: int
    size: int

    @property
    def power(self) -> int:
        """Ranks that take part in the rounds: the largest power of two <= size."""
        return 1 << (self.size.bit_length() - 1)

    @property
    def extra(self) -> int:
        """Ranks folded into a neighbour before the rounds."""
        return self.size - self.power

    @property
    def rounds(self) -> int:
        """Exchange rounds among the virtual ranks: log2 of ``power``."""
        return self.power.bit_length() - 1

    @property
    def folded(self) -> bool:
        """This rank hands its data to ``rank + 1`` and sits the rounds out."""
        return self.rank < 2 * self.extra and self.rank % 2 == 0

    @property
    def host(self) -> bool:
        """This rank takes in ``rank - 1``'s data before the rounds and returns the result."""
        return self.rank < 2 * self.extra and self.rank % 2 == 1

    @property
    def virtual(self) -> int:
        """This rank's number among the ranks that run the rounds."""
        return self.rank // 2 if self.rank < 2 * self.extra else self.rank - self.extra

    def partner(self, round_index: int) -> int:
        """The real rank this rank exchanges with in round ``round_index``."""
        other = self.virtual ^ (1 << round_index)
        return other * 2 + 1 if other < self.extra else other + self.extra
