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
Fed each node's own answers (:meth:`QuantileSearch.update_nodes`), the search keeps, per node,
the counts it answered at the points it counted at (the threshold snapped to its grid). A node's
count is non-decreasing in ``t``, so where it withheld ``t`` its count lies between its counts at
the nearest points it did answer around ``t`` (0 below all of them, its number of values above
all of them). The pooled count at ``t`` is then known to lie in ``[L(t), U(t)]``, the sums of the
nodes' lower and upper bounds (exact where every node answered): ``t`` is a valid upper end of
``x_k``'s cell when ``L(t) >= k + 1``, a valid lower end when ``U(t) <= k``. Withheld counts thus
widen the cells they touch instead of discarding the thresholds. The search

* snaps its thresholds to the coarsest grid it was told of (:meth:`QuantileSearch.set_resolution`;
  the finer power-of-ten grids of the other nodes hold every point of it) and never refines a cell
  below one grid step: the tolerance is at least half the step (``min_tol``); where the grid sets
  the tolerance, every order statistic is refined to one step, whatever its weight;
* never asks a threshold twice; where a node withheld the point two grid steps inside an end of a
  cell, also asks the point next to that end (withheld stretches are tails of few values or the
  surroundings of a cut: the point next to one may be answered), so that, say, the cell of the 75%
  quantile of a 0/1 column reaches down to ``1 - step``;
* gives up on an order statistic when a round asked thresholds inside its cell and its cell did
  not shrink; it also stops after ``max_rounds`` rounds;
* reports an order statistic it gave up on (or left unresolved) as the middle of its cell
  ``(a, b]``, within ``(b - a) / 2``, or NaN when the cell is unbounded (no valid end on one side),
  when both ends are *data-free* (``L(a) == 0``: no value is known to lie at or below ``a``, it may
  lie below every value; ``U(b) == n``: it may lie above every value: such ends say where the
  search or the nodes' fences reached, nothing of where the values are), or when it is the
  minimum (maximum) and its lower (upper) end is data-free: so the min and max stay unknown where
  nodes withhold the counts near them. With one data-free end, the estimate is the other end
  (``b``, or the first grid point above ``a``), within the whole cell: the values lie towards the
  end that is a cut, not out at the fence (the 25% quantile of a 0/1 column with 37% zeros, whose
  cell is ``(fence, 0]``, is 0);
* reports an order statistic on a *tie* at the grid point itself: when its cell ``(a, b]`` is at
  most one grid step wide and surely holds many values (at least 5, at a density 8 times that of
  the known cells on either side), they are most likely one value held many times, on the grid (a
  0/1 column, small integer codes): the estimate is ``b``, within ``b - a``, so that the median of
  a 0/1 column with 60% ones is 1 (measured on continuous data: 2 order statistics in 1000 taken
  for a tie, their estimate then within a step instead of half a step).

The result is therefore exact (to float precision, or within ``tol``) when no node rounds or
withholds; exact to within the nodes' grid resolution where every node answers (each order
statistic within half a step, a step on a tie, so a quantile interpolated between two within one
step); and approximate, with the bound stated by :meth:`QuantileSearch.result_with_bounds`,
otherwise. The bound always holds, whatever the nodes withheld: it rests only on the counts they
answered and on monotonicity.

Rounds (measured, 32 points, normal, log-normal, uniform, bimodal, integer data, n = 2 to 1e5,
nothing withheld): 1 for a constant column or n == 1 (via :meth:`QuantileSearch.from_moments`);
3 to 6 for the median; 5 to 8 for quartiles; 6 to 10 for q = 0, .1, .25, .5, .9, 1 (ten order
statistics, the min and max isolated ones that only bisection finds); ~14 for a constant column
when neither its mean nor a degenerate bracket is given. Once a cell holds one value it shrinks
``p + 1``-fold per round with its share ``p`` of the points: ``log(width w_k / 2 tol) / log(p + 1)``
rounds; points are shared so that all cells finish in as few rounds as possible. More points,
fewer rounds.

The parts: ``quantile_counts`` keeps what the nodes answered, ``quantile_cells`` reads each order
statistic's cell, estimate and tolerance off it, ``quantile_planning`` chooses the next round's
thresholds; :class:`QuantileSearch` here takes the answers and gives the results.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fedlab.analytics.grid import snap
from fedlab.analytics.quantile_cells import fraction, order_statistics
from fedlab.analytics.quantile_counts import NodeAnswer, SourceCounts, common_point, pool_counts
from fedlab.analytics.quantile_planning import ThresholdPlanner
from fedlab.errors import FedlabConfigError, FedlabDatasetError, FedlabProtocolError

__all__ = ["NodeAnswer", "QuantileSearch", "pool_counts", "snap"]

_POOLED = "\0pooled"  # the source of counts given to update(): the federation as one node


class QuantileSearch(ThresholdPlanner):
    """Locate the pooled quantiles ``q`` of ``n`` values, one round of threshold counts at a time.

    Drive it with::

        search = QuantileSearch.from_moments(q, merged.count, merged.mean, merged.std,
                                             resolution=largest_node_resolution)
        while (ts := search.next_thresholds()) is not None:
            search.update_nodes({node: NodeAnswer(p.below, p.resolution, count_of[node])
                                 for node, p in node_partials.items()})   # None = withheld
            search.set_resolution(largest_node_resolution)
        search.result()                        # {q: value}
        search.result_with_bounds()            # {q: (value, half_width)}: 0 when exact
        search.approximate                     # the q whose search some node cut short

    or, with counts already pooled (exact where given, None where any node withheld),
    ``search.update(*pool_counts(ts, answers))``: a withheld pooled count is then only bounded by
    its neighbours, whereas per node the other nodes' answers still count.

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
            (lo_k, hi_k), frac = order_statistics(x, self.n), fraction(x, self.n)
            for k, w in ((lo_k, 1.0 - frac), (hi_k, frac)) if hi_k != lo_k else ((lo_k, 1.0),):
                self._weight[k] = max(self._weight.get(k, 0.0), w)
        self._targets = sorted(self._weight)
        self._sources: dict[str, SourceCounts] = {}  # per node (or _POOLED): the counts it answered
        self._t: list[float] = []  # every point some source answered at, sorted
        self._lo: list[int] = []  # L(t): the pooled count at each is at least this, non-decreasing
        self._hi: list[int] = []  # U(t): and at most this, non-decreasing
        self._asked: set[float] = set()  # every threshold asked or counted at, withheld or not
        self._withheld: list[float] = []  # the thresholds some node withheld, sorted
        self._stalled: set[int] = set()  # order statistics given up on: a round brought no progress
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
            lo_k, hi_k = order_statistics(x, self.n)
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

        A count of None (some node withheld it) only lies between its neighbours'. ``at``, when
        given, is for each threshold the point the nodes actually counted at (they may have rounded
        it to their grid, see :func:`pool_counts`), or None where they did not all count at the same
        point (the count is then no count at any one point: ignored). Per-node answers say more:
        see :meth:`update_nodes` (a search takes one kind or the other).
        """
        pending = self._waiting()
        if len(below_counts) != len(pending):
            raise FedlabProtocolError(f"{len(below_counts)} counts for {len(pending)} thresholds",
                                      code="invalid_field", field="below")
        if at is not None and len(at) != len(pending):
            raise FedlabProtocolError(f"{len(at)} counted points for {len(pending)} thresholds",
                                      code="invalid_field", field="at")
        if set(self._sources) - {_POOLED}:
            raise FedlabProtocolError("this search was given per-node counts: keep to update_nodes()",
                                      code="out_of_order")
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
        source = self._sources.get(_POOLED, SourceCounts(self.n)).with_answers(observed)
        self._commit({_POOLED: source}, [p for p, _ in observed],
                     [t for t, c in zip(pending, below_counts, strict=True) if c is None])

    def update_nodes(self, answers: Mapping[str, NodeAnswer | tuple[Sequence[int | None], float | None, int]],
                     ) -> None:
        """Record each node's counts of values ``<=`` the thresholds of :meth:`next_thresholds`.

        ``answers``: per node (the same nodes every round), its :class:`NodeAnswer`: ``below``
        (None where it withheld the count), the ``resolution`` it rounded each threshold to (the
        point it counted at is the threshold snapped to that grid, see :func:`snap`) and ``n``, its
        number of values: these must add up to the search's ``n``.
        """
        pending = self._waiting()
        if _POOLED in self._sources:
            raise FedlabProtocolError("this search was given pooled counts: keep to update()", code="out_of_order")
        if self._sources and set(answers) != set(self._sources):
            raise FedlabProtocolError(f"answers from nodes {sorted(answers)}, but the search is over "
                                      f"{sorted(self._sources)}: start a new search", code="invalid_field",
                                      field="below")
        sources: dict[str, SourceCounts] = {}
        counted_at: list[set[float]] = [set() for _ in pending]
        withheld: set[float] = set()
        total = 0
        for node, answer in answers.items():
            below, resolution, count = answer[0], answer[1], answer[2]
            at = answer[3] if len(answer) > 3 else None
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise FedlabProtocolError(f"node {node}'s count of values must be an integer >= 0, got {count!r}",
                                          code="invalid_field", field="count")
            known = self._sources.get(node)
            if known is not None and known.n != count:
                raise FedlabProtocolError(f"node {node} holds {count} values, {known.n} before",
                                          code="invalid_field", field="count")
            if len(below) != len(pending):
                raise FedlabProtocolError(f"{len(below)} counts for {len(pending)} thresholds",
                                          code="invalid_field", field="below")
            step = float(resolution) if resolution else None
            if step is not None and not (math.isfinite(step) and step > 0):
                raise FedlabProtocolError(f"node {node}'s resolution must be a positive number, got {resolution!r}",
                                          code="invalid_field", field="resolution")
            if at is not None and (len(at) != len(pending) or any(math.isnan(float(x)) for x in at)):
                raise FedlabProtocolError(f"node {node} sent {len(at)} points for {len(pending)} thresholds",
                                          code="invalid_field", field="below_at")
            observed: list[tuple[float, int]] = []
            for j, (t, c) in enumerate(zip(pending, below, strict=True)):
                p = float(at[j]) if at is not None else snap(float(t), step)
                counted_at[j].add(p)
                if c is None:
                    withheld.add(t)
                    continue
                if isinstance(c, bool) or not 0 <= int(c) <= count:
                    raise FedlabProtocolError(f"node {node}'s count {c} below {t} is not within [0, {count}]",
                                              code="invalid_field", field="below")
                observed.append((p, int(c)))
            sources[node] = (known or SourceCounts(count)).with_answers(observed)
            total += count
        if total != self.n:
            raise FedlabProtocolError(f"the nodes hold {total} values, the search is over {self.n}",
                                      code="invalid_field", field="count")
        self._commit(sources, [x for seen in counted_at if (x := common_point(seen)) is not None], withheld)

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
            lo_k, hi_k = order_statistics(x, self.n)
            (a, ea), (b, eb), t = self._estimate(lo_k), self._estimate(hi_k), fraction(x, self.n)
            value = a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)  # numpy's lerp
            bound = ea if hi_k == lo_k else (1 - t) * ea + t * eb
            out[x] = (value, math.inf) if math.isnan(value) else (value, bound)
        return out

    # -- the known counts ------------------------------------------------------------------------

    def _waiting(self) -> list[float]:
        if self._pending is None:
            raise FedlabProtocolError("update() without thresholds: call next_thresholds() first",
                                      code="out_of_order")
        return self._pending

    def _commit(self, sources: dict[str, SourceCounts], counted_at: Iterable[float], withheld: Iterable[float]) -> None:
        """Take the (checked) new counts; give up on the cells a round asked into without progress."""
        pending = self._waiting()
        cells = {k: self._bounds(self._cell(k)) for k in self._targets if not self._resolved(k)}
        self._sources = sources
        self._t = sorted({p for s in sources.values() for p in s.points})
        self._lo = [sum(s.low(t) for s in sources.values()) for t in self._t]
        self._hi = [sum(s.high(t) for s in sources.values()) for t in self._t]
        self._asked.update(pending)
        self._asked.update(counted_at)
        self._withheld = sorted({*self._withheld, *withheld})
        # an order statistic whose cell was asked about this round and did not shrink cannot be
        # refined: the nodes withhold there (or round every point onto its ends)
        for k, (a, b) in cells.items():
            if any(a < t < b for t in pending) and self._bounds(self._cell(k)) == (a, b):
                self._stalled.add(k)
        self._pending = None
        self.rounds += 1
