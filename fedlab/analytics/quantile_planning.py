"""Where a quantile search asks next: the thresholds of each round, shared among the open cells.

Round 1 spreads points over the initial bracket (and tries the mean, so a constant column is
exact at once); later rounds give each cell that still holds an unresolved order statistic its
share of ``points_per_round``, so that all cells finish in as few rounds as possible: split evenly,
plus, in dense cells, a window where interpolating the counts puts the target; beyond the known
points, geometrically outwards (``fedlab.analytics.quantiles`` has the method and its figures).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator
from typing import TypeVar

from fedlab.analytics.grid import from_ordinal, grid_point, ordinal, snap
from fedlab.analytics.quantile_cells import SLACK, QuantileCells
from fedlab.errors import FedlabDataQualityError

__all__ = ["ThresholdPlanner"]

_DENSE = 16  # a cell with at least this many values is searched by interpolation too
_MAX = 1.7976931348623157e308
_K = TypeVar("_K")


class ThresholdPlanner(QuantileCells):
    """The planning half of :class:`~fedlab.analytics.quantiles.QuantileSearch`: the thresholds to
    ask, from the cells :class:`QuantileCells` reads off the known counts."""

    def _scale(self) -> float:
        """A step for looking beyond the known thresholds."""
        span = (self._t[-1] - self._t[0]) if self._t else self.bracket[1] - self.bracket[0]
        step = span if span > 0 else (abs(self.bracket[0]) or 1.0) * 2.0**-32
        return max(step, self.resolution or 0.0)

    def _snap(self, t: float) -> float:
        return snap(t, self.resolution) if self.resolution is not None else t

    def _initial(self) -> list[float]:
        lo, hi = self.bracket
        p = self.points_per_round
        # if all values equal the mean (or the degenerate bracket), [prev(c), c] proves it at once
        exact = {c for m in {self.mean, lo if lo == hi else None} if m is not None
                 for c in (from_ordinal(ordinal(m) - 1), m)}
        p -= len(exact)
        if lo == hi:
            out = exact | set(_outward(lo, -self._scale(), p // 2)) | set(_outward(lo, self._scale(), p // 2))
        else:
            inner = p - 4 if p >= 8 else max(p, 2)
            out = exact | {_between(lo, hi, i / (inner - 1)) for i in range(inner)}
            if p >= 8:  # a first look outside, spares a round for skewed data
                w = min(hi - lo, _MAX)
                out |= {max(-_MAX, lo - f * w) for f in (0.25, 2.0)} | {min(_MAX, hi + f * w) for f in (0.25, 2.0)}
        return sorted({self._snap(t) for t in out})

    def _plan(self) -> list[float] | None:
        if not self._t:  # every count so far was withheld: nothing to refine from
            self._stalled.update(self._targets)
            return None
        while True:
            cells: dict[tuple[int, int], list[int]] = {}
            for k in self._targets:
                if not self._resolved(k):
                    cells.setdefault(self._cell(k), []).append(k)
            if not cells:
                return None
            tol, total = self._tolerance(), self.points_per_round
            # how many-fold each cell must still shrink; cells not yet bounded first
            need = {c: math.inf if self._width(c) == math.inf
                    else max(2.0, self._width(c) * max(self._weight_at(k, tol) for k in ks) / (2 * max(tol, 1e-300)))
                    for c, ks in cells.items()}
            order = sorted(cells, key=lambda c: -need[c])
            if len(order) >= total:
                points = dict.fromkeys(order[:total], 1)
            else:
                points = {c: total // len(order) for c in order if need[c] == math.inf}
                points.update(_allocate({c: need[c] for c in order if c not in points},
                                        total - sum(points.values())))
            out: set[float] = set()
            for c, p in points.items():
                ends = self._ends(c)[:p]
                fresh = self._fresh(c, ends + self._points(c, cells[c], max(p - len(ends), 0)))
                if fresh:
                    out.update(fresh)
                else:  # no point left to ask in this cell (all asked and withheld, or off the grid)
                    self._stalled.update(cells[c])
            if out:
                return sorted(out)

    def _ends(self, cell: tuple[int, int]) -> list[float]:
        """The grid point next to an end of the (bounded) cell where a node withheld the point two
        steps in: nodes withhold stretches (a tail of few values, the points near an earlier cut),
        and the point next to the stretch may still be answered, bringing the end up to a tie."""
        r = self.resolution
        if r is None or not self._bounded(cell):
            return []
        a, b = self._bounds(cell)
        i, j = bisect.bisect_right(self._withheld, a), bisect.bisect_left(self._withheld, b)
        if i >= j:  # nothing withheld inside
            return []
        near = 2 * r * (1 + SLACK)
        points = ([self._above(a)] if self._withheld[i] - a <= near else []) + (
            [self._below(b)] if b - self._withheld[j - 1] <= near else [])
        return [t for t in points if a < t < b and t not in self._asked]

    def _fresh(self, cell: tuple[int, int], points: Iterable[float]) -> list[float]:
        """The points, snapped to the grid, strictly inside the cell and never asked; if none is
        left, the first other point of the cell that was never asked (if there is one)."""
        a, b = self._bounds(cell)
        out = {s for t in points if a < (s := self._snap(t)) < b and s not in self._asked}
        if not out:
            out = set(next(([s] for s in self._spares(cell, a, b) if a < s < b and s not in self._asked), []))
        return sorted(out)

    def _spares(self, cell: tuple[int, int], a: float, b: float) -> Iterator[float]:
        """Other points of the cell, best first: further out for an unbounded cell, else from the
        middle outwards (grid points with a grid)."""
        if not self._bounded(cell):
            start, step = (self._t[0], -self._scale()) if cell[0] < 0 else (self._t[-1], self._scale())
            yield from (self._snap(t) for t in _outward(start, step, 40))
            return
        if self.resolution is None:
            yield _between(a, b, 0.5)
            yield from_ordinal((ordinal(a) + ordinal(b)) // 2)
            return
        middle = _between(a, b, 0.5) / self.resolution
        if not abs(middle) < 2.0**52:
            return
        m = round(middle)
        for j in range(64):
            yield grid_point(m + j, self.resolution)
            yield grid_point(m - j - 1, self.resolution)

    def _width(self, cell: tuple[int, int]) -> float:
        a, b = self._bounds(cell)
        return b - a if self._bounded(cell) else math.inf

    def _points(self, cell: tuple[int, int], targets: list[int], p: int) -> list[float]:
        i, j = cell
        if i < 0:  # no known point with few enough values below: look below every one
            if self._t[0] <= -_MAX:
                if j == 0:  # at least k + 1 values <= -max
                    raise FedlabDataQualityError("the column holds -inf values: quantiles need finite values")
                return []
            return _outward(self._t[0], -self._scale(), p)
        if j == len(self._t):
            if self._t[-1] >= _MAX:
                if i == len(self._t) - 1:  # at least n - k values > max
                    raise FedlabDataQualityError("the column holds inf values: quantiles need finite values")
                return []
            return _outward(self._t[-1], self._scale(), p)
        a, b = self._t[i], self._t[j]
        oa, ob = ordinal(a), ordinal(b)
        if ob - oa - 1 <= p:
            return [from_ordinal(o) for o in range(oa + 1, ob)]
        # the counts at the ends, as well as they are known (exact where every node answered)
        ca, cb = (self._lo[i] + self._hi[i]) / 2, (self._lo[j] + self._hi[j]) / 2
        # split the floats evenly when they are few, or when one cell holds every value (a constant
        # column in a wide bracket: only adjacent floats resolve it, <= 64 bits to find)
        if ob - oa - 1 <= 16 * p or (self._hi[i] == 0 and self._lo[j] == self.n and self.tol is None
                                     and self.resolution is None):
            return [from_ordinal(oa + (ob - oa) * f // (p + 1)) for f in range(1, p + 1)]
        m = cb - ca
        # interpolate only where the values look spread out: not if the density of the cell jumped
        # since the last round (a tie / point mass: interpolation would aim at the wrong place)
        density = m / (b - a)
        before = min((self._density.get(k, math.inf) for k in targets), default=math.inf)
        dense = m >= _DENSE and p >= 4 and density <= 4 * before
        self._density.update(dict.fromkeys(targets, density))
        even = p // 2 if dense else p
        pts = [_between(a, b, f / (even + 1)) for f in range(1, even + 1)]
        if dense:  # one window around where interpolation puts the cell's targets
            lo_f = min(1.0, max(0.0, (min(targets) + 0.5 - ca) / m))
            hi_f = min(1.0, max(0.0, (max(targets) + 0.5 - ca) / m))
            lo_w = max(0.0, lo_f - 3 * math.sqrt(lo_f * (1 - lo_f) / m) - 1 / m)
            hi_w = min(1.0, hi_f + 3 * math.sqrt(hi_f * (1 - hi_f) / m) + 1 / m)
            pw = p - even
            pts += [_between(a, b, lo_w + (hi_w - lo_w) * f / (pw - 1)) for f in range(pw)]
        return [t for t in pts if a < t < b]


def _between(a: float, b: float, f: float) -> float:
    """The point a fraction f of the way from a to b (no overflow even from -max to max)."""
    return a * (1 - f) + b * f if f < 1 else b


def _allocate(need: dict[_K, float], total: int) -> dict[_K, int]:
    """Split ``total`` points so that every cell reaches its needed shrink factor in as few rounds
    as possible: the fewest r with sum(need ** (1/r) - 1) <= total, then spare points to the
    neediest."""
    if not need:
        return {}
    r = 1
    while True:
        points = {i: max(1, math.ceil(f ** (1 / r) - 1 - 1e-9)) for i, f in need.items()}
        if sum(points.values()) <= total:
            break
        r += 1
    spare = total - sum(points.values())
    order = sorted(need, key=lambda i: -need[i])
    for j in range(spare):
        points[order[j % len(order)]] += 1
    return points


def _outward(start: float, step: float, p: int) -> list[float]:
    """p thresholds beyond ``start`` at ``step / 4, step, 4 step, ...`` (clipped to finite floats)."""
    return [max(-_MAX, min(_MAX, start + step * 4.0 ** (j - 1))) for j in range(p)]
