"""Federated quantiles from counts alone: a multi-threshold search over order statistics.

No node can send its sorted values, but each can say how many of its values are ``<= t`` for a
few thresholds ``t`` (``NumericPartial.below``); summed over nodes that is the pooled count.
Pandas' default ('linear') quantile of the pooled values ``x_0 <= ... <= x_{n-1}`` is, with
``h = (n - 1) q``, ``x_floor(h) + (h - floor(h)) (x_ceil(h) - x_floor(h))``, so it is enough to
locate the order statistics ``x_k``: ``x_k`` is the smallest ``t`` with ``count(<= t) >= k + 1``,
hence ``x_k`` lies in ``(a, b]`` for any two thresholds with ``count(a) <= k < count(b)``.

Each round :class:`QuantileSearch` asks for ``points_per_round`` thresholds, shared among the
cells ``(a, b]`` that still hold an unresolved ``x_k`` (adjacent ``x_k`` share a cell until they
part). In a cell holding many values, half the points go where linear interpolation of the counts
predicts ``x_k`` (the counts are a CDF: like Newton's method this converges much faster than
bisection while the data is dense); the other half, and all of them in sparse cells, split the
cell evenly, so a cell shrinks at least ``p / 2 + 1``-fold per round whatever the data. Thresholds
outside the initial bracket, spaced geometrically, extend it when counts show values beyond it.

``x_k`` is resolved when its cell is at most ``2 tol / w_k`` wide, ``w_k`` being the largest weight
(``1 - frac`` or ``frac``) with which it enters a requested quantile: its estimate, the midpoint,
is then within ``tol / w_k`` and every quantile within ``tol``. It is also resolved when ``a`` and
``b`` are adjacent floats: then ``x_k == b`` exactly. The first round also tries the mean and the
float just below it, so a constant column (and n == 1) is exact after one round. The default
``tol`` is ``rel_tol`` (1e-7) times the width of the smallest known interval holding all values
(else of the initial bracket): with mean +- 4 std, errors stay within a few 1e-7 x (max - min).

**What nodes withhold.** A node may round every threshold to its power-of-ten grid (its
``NumericPartial.resolution``) and may withhold the count at a threshold (``None``): too few
values on one side, too close to a cut it answered before, or the researcher's allowance spent.
So the search

* snaps its thresholds to the coarsest grid it was told of (:meth:`QuantileSearch.set_resolution`;
  the finer power-of-ten grids of the other nodes hold every point of it) and never refines a cell
  below one grid step: the tolerance is at least half the step (``min_tol``);
* ignores withheld thresholds (they do not enter the known CDF) and never asks one again;
* gives up on an order statistic when a round asked thresholds inside its cell and brought back
  none usable there: its estimate is the middle of its known cell ``(a, b]``, within ``(b - a) / 2``,
  or NaN when the cell is unbounded: no usable threshold on one side, or only one below every value
  (count 0) or above every value (count n), which bounds nothing but the search's own reach (so
  the min and max stay unknown where nodes withhold the counts near them); a search also stops
  after ``max_rounds`` rounds.

The result is therefore exact (to float precision, or within ``tol``) when no node rounds or
withholds; exact to within the nodes' grid resolution where every node answers (each order
statistic within half a step, so a quantile interpolated between two within one step); and
approximate, with the bound stated by :meth:`QuantileSearch.result_with_bounds`, otherwise.

Rounds (measured, 32 points, normal, log-normal, uniform, bimodal, integer data, n = 2 to 1e5,
nothing withheld): 1 for a constant column or n == 1 (via :meth:`QuantileSearch.from_moments`);
3 to 6 for the median; 5 to 8 for quartiles; 6 to 10 for q = 0, .1, .25, .5, .9, 1 (ten order
statistics, the min and max isolated ones that only bisection finds); ~14 for a constant column
when neither its mean nor a degenerate bracket is given. Once a cell holds one value it shrinks
``p + 1``-fold per round with its share ``p`` of the points: ``log(width w_k / 2 tol) / log(p + 1)``
rounds; points are shared so that all cells finish in as few rounds as possible. More points,
fewer rounds.
"""

from __future__ import annotations

import bisect
import math
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from fedlab.errors import FedlabConfigError, FedlabDataQualityError, FedlabDatasetError, FedlabProtocolError

__all__ = ["QuantileSearch", "pool_counts", "snap"]

_DENSE = 16  # a cell with at least this many values is searched by interpolation too
_MAX = 1.7976931348623157e308
_SLACK = 1e-9  # relative: a cell one grid step wide, computed in floats, is one step wide


class QuantileSearch:
    """Locate the pooled quantiles ``q`` of ``n`` values, one round of threshold counts at a time.

    Drive it with::

        search = QuantileSearch.from_moments(q, merged.count, merged.mean, merged.std,
                                             resolution=largest_node_resolution)
        while (ts := search.next_thresholds()) is not None:
            counts, at = pool_counts(ts, [(p.below, p.resolution) for p in node_partials])
            search.update(counts, at=at)       # None = withheld by some node: ignored
            search.set_resolution(largest_node_resolution)
        search.result()                        # {q: value}
        search.result_with_bounds()            # {q: (value, half_width)}: 0 when exact
        search.approximate                     # the q whose search some node cut short

    ``min_tol``: the smallest tolerance (no refinement below it); ``resolution``: the nodes'
    coarsest threshold grid step, implying ``min_tol >= resolution / 2`` (see
    :meth:`set_resolution`); ``max_rounds``: the search stops after this many rounds, whatever is
    left unresolved being reported as approximate.
    """

    def __init__(self, q: Sequence[float], n: int, bracket: tuple[float, float], *, tol: float | None = None,
                 rel_tol: float = 1e-7, points_per_round: int = 32, mean: float | None = None,
                 min_tol: float | None = None, resolution: float | None = None, max_rounds: int = 60) -> None:
        self.q = [float(x) for x in q]
        if not self.q or not all(0.0 <= x <= 1.0 for x in self.q):
            raise FedlabConfigError(f"quantiles must be numbers in [0, 1], got {list(q)}")
        if n <= 0:
            raise FedlabDatasetError("the column has no values on any node: its quantiles are undefined")
        lo, hi = float(bracket[0]), float(bracket[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise FedlabConfigError(f"the initial bracket must be finite with lo <= hi, got {bracket}; "
                                    "for one value or a zero std pass (mean, mean)")
        if tol is not None and not tol > 0:
            raise FedlabConfigError(f"tol must be positive, got {tol}")
        if min_tol is not None and not (min_tol >= 0 and math.isfinite(min_tol)):
            raise FedlabConfigError(f"min_tol must be a finite number >= 0, got {min_tol}")
        if points_per_round < 2:
            raise FedlabConfigError(f"points_per_round must be at least 2, got {points_per_round}")
        if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
            raise FedlabConfigError(f"max_rounds must be an integer >= 1, got {max_rounds!r}")
        self.n = int(n)
        self.bracket = (lo, hi)
        self.tol, self.rel_tol, self.points_per_round = tol, rel_tol, points_per_round
        self.min_tol = float(min_tol or 0.0)
        self.max_rounds = max_rounds
        self.resolution: float | None = None  # the grid thresholds are snapped to (None: not snapped)
        self.rounds = 0
        self.mean = mean if mean is not None and math.isfinite(mean) else None
        # x_k enters a result with weight (1 - frac) or frac: x_k within tol / weight is enough
        self._weight: dict[int, float] = {}
        for x in self.q:
            (lo_k, hi_k), frac = _order_statistics(x, self.n), _frac(x, self.n)
            for k, w in ((lo_k, 1.0 - frac), (hi_k, frac)) if hi_k != lo_k else ((lo_k, 1.0),):
                self._weight[k] = max(self._weight.get(k, 0.0), w)
        self._targets = sorted(self._weight)
        self._t: list[float] = []  # thresholds with a known pooled count, sorted
        self._c: list[int] = []  # pooled count(<= t) for each, non-decreasing
        self._asked: set[float] = set()  # every threshold asked or counted at, withheld or not
        self._stalled: set[int] = set()  # order statistics given up on: no usable threshold came
        self._pending: list[float] | None = None
        self._density: dict[int, float] = {}  # values per unit of x_k's cell when last planned
        self.set_resolution(resolution)

    @classmethod
    def from_moments(cls, q: Sequence[float], n: int, mean: float, std: float, *, width: float = 4.0,
                     **kwargs: Any) -> QuantileSearch:
        """A search bracketed by ``mean +- width * std``, or ``(mean, mean)`` when std is 0 or NaN."""
        spread = width * std if math.isfinite(std) and std > 0 else 0.0
        return cls(q, n, (mean - spread, mean + spread), mean=mean, **kwargs)

    def set_resolution(self, resolution: float | None) -> None:
        """Tell the search the nodes' threshold grid step (the largest ``NumericPartial.resolution``).

        From the next planned round on, thresholds are snapped to that grid (so that every node
        counts at the very point asked) and no cell is refined below one step: ``min_tol`` becomes
        at least ``resolution / 2``. A smaller step than one given before, 0 or None change
        nothing. Call it between rounds (thresholds already handed out are not changed).
        """
        if resolution is None or resolution == 0:
            return
        r = float(resolution)
        if not (math.isfinite(r) and r > 0):
            raise FedlabConfigError(f"the threshold resolution must be a positive number, got {resolution!r}")
        if self.resolution is None or r > self.resolution:
            self.resolution = r
            self.min_tol = max(self.min_tol, r / 2)

    @property
    def finished(self) -> bool:
        if self._pending is not None:
            return False
        return self.rounds >= self.max_rounds or all(self._resolved(k) for k in self._targets)

    @property
    def approximate(self) -> list[float]:
        """The levels q whose value rests on an order statistic the search gave up on (some node
        withheld the thresholds that would have located it) or left unresolved at ``max_rounds``."""
        loose = {k for k in self._targets if k in self._stalled or not self._resolved(k)}
        out = []
        for x in self.q:
            lo_k, hi_k = _order_statistics(x, self.n)
            if lo_k in loose or (hi_k != lo_k and hi_k in loose):
                out.append(x)
        return out

    def next_thresholds(self) -> list[float] | None:
        """The thresholds to count values ``<=`` at this round, or None when the search is done."""
        if self._pending is None and not self.finished:
            self._pending = self._initial() if self.rounds == 0 else self._plan()
        return None if self._pending is None else list(self._pending)

    def update(self, below_counts: Sequence[int | None], *, at: Sequence[float | None] | None = None) -> None:
        """Record the pooled counts of values ``<=`` each threshold of :meth:`next_thresholds`.

        A count of None (some node withheld it) is ignored. ``at``, when given, is for each
        threshold the point the nodes actually counted at (they may have rounded it to their
        grid, see :func:`pool_counts`), or None where they did not all count at the same point.
        """
        pending = self._pending
        if pending is None:
            raise FedlabProtocolError("update() without thresholds: call next_thresholds() first",
                                      code="out_of_order")
        if len(below_counts) != len(pending):
            raise FedlabProtocolError(f"{len(below_counts)} counts for {len(pending)} thresholds",
                                      code="invalid_field", field="below")
        if at is not None and len(at) != len(pending):
            raise FedlabProtocolError(f"{len(at)} counted points for {len(pending)} thresholds",
                                      code="invalid_field", field="at")
        observed: list[tuple[float, int]] = []
        for j, (t, c) in enumerate(zip(pending, below_counts, strict=True)):
            point = t if at is None else at[j]
            if c is None or point is None:
                continue
            if isinstance(c, bool) or not 0 <= int(c) <= self.n:
                raise FedlabProtocolError(f"count {c} below {t} is not within [0, {self.n}]",
                                          code="invalid_field", field="below")
            p = float(point)
            if math.isnan(p):
                raise FedlabProtocolError(f"the point counted at for threshold {t} is NaN",
                                          code="invalid_field", field="at")
            observed.append((p, int(c)))
        cells = {k: self._bounds(self._cell(k)) for k in self._targets if not self._resolved(k)}
        ts, cs = list(self._t), list(self._c)
        for p, c in observed:
            i = bisect.bisect_left(ts, p)
            if i == len(ts) or ts[i] != p:
                ts.insert(i, p)
                cs.insert(i, c)
        if any(b < a for a, b in zip(cs, cs[1:], strict=False)):
            raise FedlabProtocolError("counts of values <= t decrease as t grows: nodes answered inconsistently",
                                      code="invalid_field", field="below")
        self._t, self._c = ts, cs
        self._asked.update(pending)
        self._asked.update(p for p, _ in observed)
        # an order statistic whose cell was asked about this round and got nothing usable back
        # inside it cannot be refined: the nodes withhold there (or round every point onto its ends)
        for k, (a, b) in cells.items():
            if any(a < t < b for t in pending) and not any(a < p < b for p, _ in observed):
                self._stalled.add(k)
        self._pending = None
        self.rounds += 1

    def result(self) -> dict[float, float]:
        """``{q: quantile}`` with pandas' linear interpolation between order statistics (NaN where
        an order statistic could not be bracketed on both sides)."""
        return {q: value for q, (value, _) in self.result_with_bounds().items()}

    def result_with_bounds(self) -> dict[float, tuple[float, float]]:
        """``{q: (quantile, half_width)}``: the pooled quantile lies within ``half_width`` of the
        value (0 when exact, ``inf`` with a NaN value when unbounded)."""
        if not self.finished:
            raise FedlabProtocolError("the quantile search is not finished", code="out_of_order")
        out = {}
        for x in self.q:
            lo_k, hi_k = _order_statistics(x, self.n)
            (a, ea), (b, eb), t = self._estimate(lo_k), self._estimate(hi_k), _frac(x, self.n)
            value = a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)  # numpy's lerp
            bound = ea if hi_k == lo_k else (1 - t) * ea + t * eb
            out[x] = (value, math.inf) if math.isnan(value) else (value, bound)
        return out

    # -- the search ----------------------------------------------------------------------------

    def _cell(self, k: int) -> int:
        """Index of the first threshold with count >= k + 1: x_k is in (t[i-1], t[i]]."""
        return bisect.bisect_left(self._c, k + 1)

    def _bounds(self, i: int) -> tuple[float, float]:
        """Cell i as ``(a, b)``, -inf / inf where no known threshold bounds it."""
        return (self._t[i - 1] if i > 0 else -math.inf, self._t[i] if i < len(self._t) else math.inf)

    def _resolved(self, k: int) -> bool:
        if k in self._stalled:
            return True
        i = self._cell(k)
        if i == 0 or i == len(self._t):
            return False
        a, b = self._t[i - 1], self._t[i]
        if (b - a) / 2 * self._weight[k] <= self._tolerance() or _ordinal(b) - _ordinal(a) == 1:
            return True
        return self.resolution is not None and b - a <= self.resolution * (1 + _SLACK)

    def _estimate(self, k: int) -> tuple[float, float]:
        """x_k's estimate and how far from it x_k can be.

        An x_k the search gave up on is unbounded (NaN) also where its cell ends at a threshold
        below every value (count 0) or above every value (count n): such an end says only where
        the search looked (nodes answer there without it being a cut), nothing about the data.
        """
        i = self._cell(k)
        a, b = self._bounds(i)
        if not (math.isfinite(a) and math.isfinite(b)):
            return math.nan, math.inf
        if (k in self._stalled or not self._resolved(k)) and (self._c[i - 1] == 0 or self._c[i] == self.n):
            return math.nan, math.inf
        if _ordinal(b) - _ordinal(a) == 1:
            return b, 0.0
        width = b - a
        if math.isfinite(width):
            return a + width / 2, width / 2
        return a / 2 + b / 2, b / 2 - a / 2

    def _tolerance(self) -> float:
        if self.tol is not None:
            return max(self.tol, self.min_tol)
        first, full = bisect.bisect_left(self._c, 1), bisect.bisect_left(self._c, self.n)
        if first > 0 and full < len(self._t):
            return max(self.rel_tol * (self._t[full] - self._t[first - 1]), self.min_tol)
        return max(self.rel_tol * (self.bracket[1] - self.bracket[0]), self.min_tol)

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
                 for c in (_from_ordinal(_ordinal(m) - 1), m)}
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
            cells: dict[int, list[int]] = {}
            for k in self._targets:
                if not self._resolved(k):
                    cells.setdefault(self._cell(k), []).append(k)
            if not cells:
                return None
            tol, total = self._tolerance(), self.points_per_round
            # how many-fold each cell must still shrink; cells not yet bounded first
            need = {i: math.inf if self._width(i) == math.inf
                    else max(2.0, self._width(i) * max(self._weight[k] for k in ks) / (2 * max(tol, 1e-300)))
                    for i, ks in cells.items()}
            order = sorted(cells, key=lambda i: -need[i])
            if len(order) >= total:
                points = dict.fromkeys(order[:total], 1)
            else:
                points = {i: total // len(order) for i in order if need[i] == math.inf}
                points.update(_allocate({i: need[i] for i in order if i not in points},
                                        total - sum(points.values())))
            out: set[float] = set()
            for i, p in points.items():
                fresh = self._fresh(i, self._points(i, cells[i], p))
                if fresh:
                    out.update(fresh)
                else:  # no point left to ask in this cell (all asked and withheld, or off the grid)
                    self._stalled.update(cells[i])
            if out:
                return sorted(out)

    def _fresh(self, i: int, points: Iterable[float]) -> list[float]:
        """The points, snapped to the grid, strictly inside cell i and never asked; if none is
        left, the first other point of the cell that was never asked (if there is one)."""
        a, b = self._bounds(i)
        out = {s for t in points if a < (s := self._snap(t)) < b and s not in self._asked}
        if not out:
            out = set(next(([s] for s in self._spares(i, a, b) if a < s < b and s not in self._asked), []))
        return sorted(out)

    def _spares(self, i: int, a: float, b: float) -> Iterator[float]:
        """Other points of cell i, best first: further out for an unbounded cell, else from the
        middle outwards (grid points with a grid)."""
        if i == 0 or i == len(self._t):
            start, step = (b, -self._scale()) if i == 0 else (a, self._scale())
            yield from (self._snap(t) for t in _outward(start, step, 40))
            return
        if self.resolution is None:
            yield _between(a, b, 0.5)
            yield _from_ordinal((_ordinal(a) + _ordinal(b)) // 2)
            return
        middle = _between(a, b, 0.5) / self.resolution
        if not abs(middle) < 2.0**52:
            return
        m = round(middle)
        for j in range(64):
            yield _grid_point(m + j, self.resolution)
            yield _grid_point(m - j - 1, self.resolution)

    def _width(self, i: int) -> float:
        return math.inf if i == 0 or i == len(self._t) else self._t[i] - self._t[i - 1]

    def _points(self, i: int, targets: list[int], p: int) -> list[float]:
        if i == 0:  # values below every threshold so far
            if self._t[0] <= -_MAX:
                raise FedlabDataQualityError("the column holds -inf values: quantiles need finite values")
            return _outward(self._t[0], -self._scale(), p)
        if i == len(self._t):
            if self._t[-1] >= _MAX:
                raise FedlabDataQualityError("the column holds inf values: quantiles need finite values")
            return _outward(self._t[-1], self._scale(), p)
        a, b = self._t[i - 1], self._t[i]
        oa, ob = _ordinal(a), _ordinal(b)
        if ob - oa - 1 <= p:
            return [_from_ordinal(o) for o in range(oa + 1, ob)]
        ca, cb = self._c[i - 1], self._c[i]
        # split the floats evenly when they are few, or when one cell holds every value (a constant
        # column in a wide bracket: only adjacent floats resolve it, <= 64 bits to find)
        if ob - oa - 1 <= 16 * p or (ca == 0 and cb == self.n and self.tol is None and self.resolution is None):
            return [_from_ordinal(oa + (ob - oa) * j // (p + 1)) for j in range(1, p + 1)]
        m = cb - ca
        # interpolate only where the values look spread out: not if the density of the cell jumped
        # since the last round (a tie / point mass: interpolation would aim at the wrong place)
        density = m / (b - a)
        before = min((self._density.get(k, math.inf) for k in targets), default=math.inf)
        dense = m >= _DENSE and p >= 4 and density <= 4 * before
        self._density.update(dict.fromkeys(targets, density))
        even = p // 2 if dense else p
        pts = [_between(a, b, j / (even + 1)) for j in range(1, even + 1)]
        if dense:  # one window around where interpolation puts the cell's targets
            lo_f, hi_f = (min(targets) + 0.5 - ca) / m, (max(targets) + 0.5 - ca) / m
            lo_w = max(0.0, lo_f - 3 * math.sqrt(lo_f * (1 - lo_f) / m) - 1 / m)
            hi_w = min(1.0, hi_f + 3 * math.sqrt(hi_f * (1 - hi_f) / m) + 1 / m)
            pw = p - even
            pts += [_between(a, b, lo_w + (hi_w - lo_w) * j / (pw - 1)) for j in range(pw)]
        return [t for t in pts if a < t < b]


def snap(value: float, step: float | None) -> float:
    """``value`` rounded to the nearest multiple of ``step``, as nodes round thresholds and edges.

    For a power-of-ten step the multiple is computed from integers, so that a round number
    (40, 0.5) stays exactly itself and a point on a coarse power-of-ten grid is unchanged by
    rounding to a finer one. Values beyond 2**52 steps, non-finite values and a step of None or
    0 are returned as they are.
    """
    if step is None or not step > 0 or not math.isfinite(value):
        return value
    k = value / step
    if not abs(k) < 2.0**52:
        return value
    return _grid_point(round(k), step)


def _grid_point(m: int, step: float) -> float:
    """The m-th multiple of step (exactly representable decimals for power-of-ten steps)."""
    exponent = round(math.log10(step))
    if math.isclose(step, 10.0**exponent, rel_tol=1e-12):
        return float(m * 10**exponent) if exponent >= 0 else m / 10 ** (-exponent)
    return m * step


def pool_counts(
    thresholds: Sequence[float], answers: Iterable[tuple[Sequence[int | None], float | None]],
) -> tuple[list[int | None], list[float | None]]:
    """Pool the nodes' counts below ``thresholds`` for :meth:`QuantileSearch.update`.

    ``answers``: per node, its ``below`` counts and its ``resolution`` (the grid it rounded each
    threshold to, None for none). Returns ``(counts, at)``: per threshold the sum of the nodes'
    counts, None where any node withheld it; and the point they all counted at, None where they
    rounded it to different points (a sum over different points is no count at any one point).
    """
    counts: list[int | None] = [0] * len(thresholds)
    points: list[set[float]] = [set() for _ in thresholds]
    for below, resolution in answers:
        if len(below) != len(thresholds):
            raise FedlabProtocolError(f"{len(below)} counts for {len(thresholds)} thresholds",
                                      code="invalid_field", field="below")
        for j, (t, c) in enumerate(zip(thresholds, below, strict=True)):
            points[j].add(snap(float(t), resolution))
            total = counts[j]
            counts[j] = None if c is None or total is None else total + int(c)
    at: list[float | None] = []
    for t, seen in zip(thresholds, points, strict=True):
        if not seen:
            at.append(float(t))
        elif max(seen) - min(seen) <= 1e-12 * max(abs(max(seen)), abs(min(seen))):
            at.append(max(seen))
        else:
            at.append(None)
    return counts, at


def _order_statistics(q: float, n: int) -> tuple[int, int]:
    """The (0-based) order statistics that pandas' linear quantile q of n values interpolates."""
    h = (n - 1) * q
    lo = math.floor(h)
    return lo, (min(lo + 1, n - 1) if h > lo else lo)


def _between(a: float, b: float, f: float) -> float:
    """The point a fraction f of the way from a to b (no overflow even from -max to max)."""
    return a * (1 - f) + b * f if f < 1 else b


def _frac(q: float, n: int) -> float:
    h = (n - 1) * q
    return h - math.floor(h)


def _allocate(need: dict[int, float], total: int) -> dict[int, int]:
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


def _ordinal(x: float) -> int:
    """An integer that orders floats like their values and steps by 1 between adjacent floats."""
    (i,) = struct.unpack("<q", struct.pack("<d", x))
    return int(i) if i >= 0 else -(int(i) & 0x7FFFFFFFFFFFFFFF)


def _from_ordinal(o: int) -> float:
    bits = o if o >= 0 else (-o) | (1 << 63)
    (x,) = struct.unpack("<d", struct.pack("<Q", bits))
    return float(x)
