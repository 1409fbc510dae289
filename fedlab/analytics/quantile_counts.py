"""What the nodes answered to a quantile search: their counts of values ``<= t``, checked and kept.

A node's count is non-decreasing in ``t``; :class:`SourceCounts` keeps one node's (or the pooled
federation's) answers at sorted points and, from monotonicity alone, bounds its count at any
other point: this is what lets withheld counts widen a cell instead of discarding a threshold
(``fedlab.analytics.quantiles`` has the whole method).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from fedlab.analytics.grid import snap
from fedlab.errors import FedlabProtocolError

__all__ = ["NodeAnswer", "SourceCounts", "common_point", "pool_counts"]


class NodeAnswer(NamedTuple):
    """One node's reply to a round of :meth:`QuantileSearch.update_nodes`: its ``below`` counts
    (None where withheld), the grid ``resolution`` it rounded the thresholds to (None for none),
    ``n``, how many values it holds (its ``NumericPartial.count`` of round 1), and ``at``, the
    points it says it counted at (``NumericPartial.below_at``; None: the thresholds snapped to
    ``resolution``)."""

    below: Sequence[int | None]
    resolution: float | None
    n: int
    at: Sequence[float] | None = None


class SourceCounts:
    """The counts one node (or the pooled federation) answered, at sorted points, and its ``n``."""

    __slots__ = ("counts", "n", "points")

    def __init__(self, n: int, points: Sequence[float] = (), counts: Sequence[int] = ()) -> None:
        self.n = n
        self.points = list(points)
        self.counts = list(counts)

    def low(self, t: float) -> int:
        """The smallest count at ``t`` consistent with the answers: that at the last point <= t."""
        j = bisect.bisect_right(self.points, t)
        return self.counts[j - 1] if j else 0

    def high(self, t: float) -> int:
        """The largest count at ``t`` consistent with the answers: that at the first point >= t."""
        j = bisect.bisect_left(self.points, t)
        return self.counts[j] if j < len(self.points) else self.n

    def with_answers(self, observed: Iterable[tuple[float, int]]) -> SourceCounts:
        points, counts = list(self.points), list(self.counts)
        for p, c in observed:
            i = bisect.bisect_left(points, p)
            if i < len(points) and points[i] == p:
                if counts[i] != c:
                    raise FedlabProtocolError(f"two counts ({counts[i]} and {c}) at the same point {p}: "
                                              "nodes answered inconsistently", code="invalid_field", field="below")
                continue
            points.insert(i, p)
            counts.insert(i, c)
        if any(b < a for a, b in zip(counts, counts[1:], strict=False)):
            raise FedlabProtocolError("counts of values <= t decrease as t grows: nodes answered inconsistently",
                                      code="invalid_field", field="below")
        return SourceCounts(self.n, points, counts)


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


def common_point(points: set[float]) -> float | None:
    """The one point all nodes counted at (up to float rounding of a non-power-of-ten grid), or None."""
    if not points:
        return None
    lo, hi = min(points), max(points)
    return hi if hi - lo <= 1e-12 * max(abs(lo), abs(hi)) else None
