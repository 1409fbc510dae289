"""What the known counts say of each order statistic: its cell, whether it is resolved, its estimate.

``x_k`` lies in the cell ``(t[i], t[j]]`` between the last known point with ``U <= k`` and the
first with ``L >= k + 1`` (``L``, ``U``: the bounds of the pooled count, summed over the nodes'
:class:`~fedlab.analytics.quantile_counts.SourceCounts`). :class:`QuantileCells` reads those cells,
the nodes' grid, ties and the tolerance; :class:`~fedlab.analytics.quantiles.QuantileSearch`
fills in the counts (the module's docstring has the method and the rules quoted here).
"""

from __future__ import annotations

import bisect
import math

from fedlab.analytics.grid import grid_point, ordinal
from fedlab.analytics.quantile_counts import SourceCounts

__all__ = ["SLACK", "QuantileCells", "fraction", "order_statistics"]

SLACK = 1e-9  # relative: a cell one grid step wide, computed in floats, is one step wide
_TIE_COUNT = 5  # a one-step cell holding at least this many values, and
_TIE_RATIO = 8.0  # this many times denser than its neighbours, holds a tie: one value many times


class QuantileCells:
    """The state of a quantile search and what it says of each order statistic ``x_k``.

    The attributes are set by :class:`~fedlab.analytics.quantiles.QuantileSearch`; this part only
    reads them.
    """

    n: int
    bracket: tuple[float, float]
    tol: float | None
    rel_tol: float
    min_tol: float
    points_per_round: int
    resolution: float | None  # the grid thresholds are snapped to (None: not snapped)
    mean: float | None
    _weight: dict[int, float]  # x_k enters a result with weight (1 - frac) or frac
    _targets: list[int]  # the order statistics the quantiles need, sorted
    _sources: dict[str, SourceCounts]  # per node (or the pooled federation): the counts it answered
    _t: list[float]  # every point some source answered at, sorted
    _lo: list[int]  # L(t): the pooled count at each is at least this, non-decreasing
    _hi: list[int]  # U(t): and at most this, non-decreasing
    _asked: set[float]  # every threshold asked or counted at, withheld or not
    _withheld: list[float]  # the thresholds some node withheld, sorted
    _stalled: set[int]  # order statistics given up on: a round brought no progress
    _density: dict[int, float]  # values per unit of x_k's cell when last planned

    def _cell(self, k: int) -> tuple[int, int]:
        """``(i, j)``: x_k is in ``(t[i], t[j]]``, ``t[i]`` the last point with ``U <= k`` (i = -1
        if none), ``t[j]`` the first with ``L >= k + 1`` (j = len(t) if none)."""
        return bisect.bisect_right(self._hi, k) - 1, bisect.bisect_left(self._lo, k + 1)

    def _bounds(self, cell: tuple[int, int]) -> tuple[float, float]:
        """The cell as ``(a, b)``, -inf / inf where no known point bounds it."""
        i, j = cell
        return (self._t[i] if i >= 0 else -math.inf, self._t[j] if j < len(self._t) else math.inf)

    def _bounded(self, cell: tuple[int, int]) -> bool:
        return cell[0] >= 0 and cell[1] < len(self._t)
    def _resolved(self, k: int) -> bool:
        if k in self._stalled:
            return True
        cell = self._cell(k)
        if not self._bounded(cell):
            return False
        a, b = self._bounds(cell)
        tol = self._tolerance()
        if (b - a) / 2 * self._weight_at(k, tol) <= tol or ordinal(b) - ordinal(a) == 1:
            return True
        return self._one_step(a, b)

    def _weight_at(self, k: int, tol: float) -> float:
        """x_k's weight in the tolerance test: 1 where the grid sets the tolerance, so that every
        order statistic ends in a cell of one step (half a step from its estimate) wherever the
        nodes answer; a lighter weight would leave a cell of two steps for a median between two."""
        if self.resolution is not None and tol <= self.resolution / 2 * (1 + SLACK):
            return 1.0
        return self._weight[k]

    def _one_step(self, a: float, b: float) -> bool:
        return self.resolution is not None and b - a <= self.resolution * (1 + SLACK)

    def _estimate(self, k: int) -> tuple[float, float]:
        """x_k's estimate and how far from it x_k can be (NaN, inf: unknown; see the module's notes)."""
        cell = self._cell(k)
        a, b = self._bounds(cell)
        if not (math.isfinite(a) and math.isfinite(b)):
            return math.nan, math.inf
        if k in self._stalled or not self._resolved(k):
            free_lo, free_hi = self._lo[cell[0]] == 0, self._hi[cell[1]] == self.n
            if (free_lo and free_hi) or (free_lo and k == 0) or (free_hi and k == self.n - 1):
                return math.nan, math.inf
            if free_lo:  # the values lie towards b, the end that is a cut
                return b, b - a
            if free_hi:  # towards a: at the first grid point above it
                near = min(self._above(a), b)
                return near, max(near - a, b - near)
        if ordinal(b) - ordinal(a) == 1:
            return b, 0.0
        width = b - a
        if self._tie(cell):
            return b, width
        if math.isfinite(width):
            return a + width / 2, width / 2
        return a / 2 + b / 2, b / 2 - a / 2

    def _above(self, a: float) -> float:
        """The first point of the grid above ``a`` (``a`` itself without a grid)."""
        r = self.resolution
        if r is None or not abs(a / r) < 2.0**52:
            return a
        m = round(a / r)
        return g if (g := grid_point(m, r)) > a else grid_point(m + 1, r)

    def _below(self, b: float) -> float:
        """The last point of the grid below ``b`` (``b`` itself without a grid)."""
        r = self.resolution
        if r is None or not abs(b / r) < 2.0**52:
            return b
        m = round(b / r)
        return g if (g := grid_point(m, r)) < b else grid_point(m - 1, r)

    def _tie(self, cell: tuple[int, int]) -> bool:
        """Whether the cell is one grid step holding a tie: many values, far denser than around it."""
        i, j = cell
        a, b = self._t[i], self._t[j]
        inside = self._lo[j] - self._hi[i]  # values surely in (a, b]
        if not self._one_step(a, b) or inside < _TIE_COUNT:
            return False
        density = inside / (b - a)
        # the values surely in the known cells next to it, (t[i-1], a] and (b, t[j+1]]: far sparser?
        if i > 0 and (self._lo[i] - self._hi[i - 1]) * _TIE_RATIO > density * (a - self._t[i - 1]):
            return False
        return not (j + 1 < len(self._t)
                    and (self._lo[j + 1] - self._hi[j]) * _TIE_RATIO > density * (self._t[j + 1] - b))

    def _tolerance(self) -> float:
        if self.tol is not None:
            return max(self.tol, self.min_tol)
        below, above = bisect.bisect_right(self._hi, 0) - 1, bisect.bisect_left(self._lo, self.n)
        if below >= 0 and above < len(self._t):  # (t[below], t[above]] holds every value
            return max(self.rel_tol * (self._t[above] - self._t[below]), self.min_tol)
        return max(self.rel_tol * (self.bracket[1] - self.bracket[0]), self.min_tol)


def order_statistics(q: float, n: int) -> tuple[int, int]:
    """The (0-based) order statistics that pandas' linear quantile q of n values interpolates."""
    h = (n - 1) * q
    lo = math.floor(h)
    return lo, (min(lo + 1, n - 1) if h > lo else lo)


def fraction(q: float, n: int) -> float:
    h = (n - 1) * q
    return h - math.floor(h)
