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

Rounds (measured, 32 points, normal, log-normal, uniform, bimodal, integer data, n = 2 to 1e5):
1 for a constant column or n == 1 (via :meth:`QuantileSearch.from_moments`); 3 to 6 for the
median; 5 to 8 for quartiles; 6 to 10 for q = 0, .1, .25, .5, .9, 1 (ten order statistics, the
min and max isolated ones that only bisection finds); ~14 for a constant column when neither its
mean nor a degenerate bracket is given. Once a cell holds one value it shrinks ``p + 1``-fold per
round with its share ``p`` of the points: ``log(width w_k / 2 tol) / log(p + 1)`` rounds; points
are shared so that all cells finish in as few rounds as possible. More points, fewer rounds.
"""

from __future__ import annotations

import bisect
import math
import struct
from collections.abc import Sequence
from typing import Any

from fedlab.errors import FedlabConfigError, FedlabDataQualityError, FedlabDatasetError, FedlabProtocolError

__all__ = ["QuantileSearch"]

_DENSE = 16  # a cell with at least this many values is searched by interpolation too
_MAX = 1.7976931348623157e308


class QuantileSearch:
    """Locate the pooled quantiles ``q`` of ``n`` values, one round of threshold counts at a time.

    Drive it with::

        search = QuantileSearch.from_moments(q, merged.count, merged.mean, merged.std)
        while (ts := search.next_thresholds()) is not None:
            search.update(merged_counts_below(ts))   # sum over nodes of count(values <= t)
        search.result()  # {q: value}
    """

    def __init__(self, q: Sequence[float], n: int, bracket: tuple[float, float], *, tol: float | None = None,
                 rel_tol: float = 1e-7, points_per_round: int = 32, mean: float | None = None) -> None:
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
        if points_per_round < 2:
            raise FedlabConfigError(f"points_per_round must be at least 2, got {points_per_round}")
        self.n = int(n)
        self.bracket = (lo, hi)
        self.tol, self.rel_tol, self.points_per_round = tol, rel_tol, points_per_round
        self.rounds = 0
        self.mean = mean if mean is not None and math.isfinite(mean) else None
        # x_k enters a result with weight (1 - frac) or frac: x_k within tol / weight is enough
        self._weight: dict[int, float] = {}
        for x in self.q:
            (lo_k, hi_k), frac = _order_statistics(x, self.n), _frac(x, self.n)
            for k, w in ((lo_k, 1.0 - frac), (hi_k, frac)) if hi_k != lo_k else ((lo_k, 1.0),):
                self._weight[k] = max(self._weight.get(k, 0.0), w)
        self._targets = sorted(self._weight)
        self._t: list[float] = []  # thresholds asked so far, sorted
        self._c: list[int] = []  # pooled count(<= t) for each, non-decreasing
        self._pending: list[float] | None = None
        self._density: dict[int, float] = {}  # values per unit of x_k's cell when last planned

    @classmethod
    def from_moments(cls, q: Sequence[float], n: int, mean: float, std: float, *, width: float = 4.0,
                     **kwargs: Any) -> QuantileSearch:
        """A search bracketed by ``mean +- width * std``, or ``(mean, mean)`` when std is 0 or NaN."""
        spread = width * std if math.isfinite(std) and std > 0 else 0.0
        return cls(q, n, (mean - spread, mean + spread), mean=mean, **kwargs)

    @property
    def finished(self) -> bool:
        return self._pending is None and all(self._resolved(k) for k in self._targets)

    def next_thresholds(self) -> list[float] | None:
        """The thresholds to count values ``<=`` at this round, or None when the search is done."""
        if self._pending is None and not self.finished:
            self._pending = self._initial() if not self._t else self._plan()
        return None if self._pending is None else list(self._pending)

    def update(self, below_counts: Sequence[int]) -> None:
        """Record the pooled counts of values ``<=`` each threshold of :meth:`next_thresholds`."""
        if self._pending is None:
            raise FedlabProtocolError("update() without thresholds: call next_thresholds() first",
                                      code="out_of_order")
        if len(below_counts) != len(self._pending):
            raise FedlabProtocolError(f"{len(below_counts)} counts for {len(self._pending)} thresholds",
                                      code="invalid_field", field="below")
        ts, cs = list(self._t), list(self._c)
        for t, c in zip(self._pending, below_counts, strict=True):
            if not 0 <= int(c) <= self.n:
                raise FedlabProtocolError(f"count {c} below {t} is not within [0, {self.n}]",
                                          code="invalid_field", field="below")
            i = bisect.bisect_left(ts, t)
            if i == len(ts) or ts[i] != t:
                ts.insert(i, t)
                cs.insert(i, int(c))
        if any(b < a for a, b in zip(cs, cs[1:], strict=False)):
            raise FedlabProtocolError("counts of values <= t decrease as t grows: nodes answered inconsistently",
                                      code="invalid_field", field="below")
        self._t, self._c = ts, cs
        self._pending = None
        self.rounds += 1

    def result(self) -> dict[float, float]:
        """``{q: quantile}`` with pandas' linear interpolation between order statistics."""
        if not self.finished:
            raise FedlabProtocolError("the quantile search is not finished", code="out_of_order")
        out = {}
        for x in self.q:
            lo_k, hi_k = _order_statistics(x, self.n)
            a, b, t = self._estimate(lo_k), self._estimate(hi_k), _frac(x, self.n)
            out[x] = a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)  # numpy's lerp
        return out

    # -- the search ----------------------------------------------------------------------------

    def _cell(self, k: int) -> int:
        """Index of the first threshold with count >= k + 1: x_k is in (t[i-1], t[i]]."""
        return bisect.bisect_left(self._c, k + 1)

    def _resolved(self, k: int) -> bool:
        i = self._cell(k)
        if i == 0 or i == len(self._t):
            return False
        a, b = self._t[i - 1], self._t[i]
        return (b - a) / 2 * self._weight[k] <= self._tolerance() or _ordinal(b) - _ordinal(a) == 1

    def _estimate(self, k: int) -> float:
        i = self._cell(k)
        a, b = self._t[i - 1], self._t[i]
        return b if _ordinal(b) - _ordinal(a) == 1 else a + (b - a) / 2

    def _tolerance(self) -> float:
        if self.tol is not None:
            return self.tol
        first, full = bisect.bisect_left(self._c, 1), bisect.bisect_left(self._c, self.n)
        if first > 0 and full < len(self._t):
            return self.rel_tol * (self._t[full] - self._t[first - 1])
        return self.rel_tol * (self.bracket[1] - self.bracket[0])

    def _scale(self) -> float:
        """A step for looking beyond the known thresholds."""
        span = (self._t[-1] - self._t[0]) if self._t else self.bracket[1] - self.bracket[0]
        return span if span > 0 else (abs(self.bracket[0]) or 1.0) * 2.0**-32

    def _initial(self) -> list[float]:
        lo, hi = self.bracket
        p = self.points_per_round
        # if all values equal the mean (or the degenerate bracket), [prev(c), c] proves it at once
        exact = {c for m in {self.mean, lo if lo == hi else None} if m is not None
                 for c in (_from_ordinal(_ordinal(m) - 1), m)}
        p -= len(exact)
        if lo == hi:
            return sorted(exact | set(_outward(lo, -self._scale(), p // 2)) | set(_outward(lo, self._scale(), p // 2)))
        inner = p - 4 if p >= 8 else max(p, 2)
        out = exact | {_between(lo, hi, i / (inner - 1)) for i in range(inner)}
        if p >= 8:  # a first look outside, spares a round for skewed data
            w = min(hi - lo, _MAX)
            out |= {max(-_MAX, lo - f * w) for f in (0.25, 2.0)} | {min(_MAX, hi + f * w) for f in (0.25, 2.0)}
        return sorted(out)

    def _plan(self) -> list[float]:
        cells: dict[int, list[int]] = {}
        for k in self._targets:
            if not self._resolved(k):
                cells.setdefault(self._cell(k), []).append(k)
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
            points.update(_allocate({i: need[i] for i in order if i not in points}, total - sum(points.values())))
        out: set[float] = set()
        for i, p in points.items():
            out.update(self._points(i, cells[i], p))
        if not out:  # cannot happen with consistent counts; never loop without progress
            raise FedlabDataQualityError("the quantile search cannot narrow its brackets any further")
        return sorted(out)

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
        if ob - oa - 1 <= 16 * p or (ca == 0 and cb == self.n and self.tol is None):
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
