"""Thresholds and histogram edges as *cuts* of a column's sorted values, and the rules on them.

What a researcher learns from "how many values are <= t" (a quantile round) or from a histogram
edge is a cut: the rank of ``t`` among the column's sorted real values. Answered cuts add up
across requests: two cuts a few ranks apart give the count between them, and a run of them
bisects towards single values. So the node keeps, per researcher and *source* column (see
:mod:`.provenance`), every rank it ever answered, and answers a new point only if

1. it lies outside the column's (noisy, fixed) range, where its count is 0 or everything and
   says nothing about any row; or its rank is at least ``max(min_count, cell_threshold)`` from
   both ends (so neither tail of fewer than min_count values is ever delimited);
2. its rank equals a stored cut, or lies at least ``cell_threshold`` ranks from every stored cut
   (so no two answers ever difference to fewer than cell_threshold values);
3. the researcher's allowance of distinct points on the column is not spent (each new point costs
   one, answered or withheld: a withheld answer says something too).

Points are first rounded, in the *source* column's own units (a derived copy's point is mapped
back through its increasing affine map, see :mod:`.provenance`), to a power-of-ten grid no finer
than ``threshold_resolution`` times the source column's standard deviation (:func:`grid_step`), so
that no answer locates a value more finely than the grid, whatever copy is asked, and so that
asking again, on any copy, or moving a point within its grid cell, costs nothing.
A withheld point's count is None. Pure: the node stores the state (:class:`CutState`).

What an unlimited researcher can learn, per source column: at most ``threshold_allowance`` counts,
at cuts at least ``cell_threshold`` ranks apart and ``min_count`` ranks from either end, at
positions rounded to the grid. Repeated refinement at one stored cut can narrow the gap between
two order statistics down to the grid step; it costs one unit per point.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedlab.analytics.grid import snap  # the researcher rounds with the very same function

__all__ = ["CutState", "Point", "answer_points", "grid_step", "snap"]

LEFT = "left"  # count of values < t (histogram edges but the last)
RIGHT = "right"  # count of values <= t (thresholds, the last histogram edge)


@dataclass(frozen=True)
class Point:
    """One asked point: its value, whether equal values count as below it, and its state key."""

    value: float
    side: str


@dataclass
class CutState:
    """What the node remembers of one researcher on one source column.

    ``ranks``: the cut ranks answered so far; ``points``: keys of the points asked so far;
    ``remaining``: how many new points the researcher may still ask. ``new_ranks``/``new_points``
    are what :func:`answer_points` added, for the caller to store with the answer.
    """

    ranks: set[int]
    points: set[str]
    remaining: int
    new_ranks: set[int] = field(default_factory=set)
    new_points: set[str] = field(default_factory=set)


def grid_step(real: np.ndarray, resolution: float) -> float:
    """The power of ten at or above ``resolution`` x std of the real values (or x their largest
    magnitude, or 1): no answer is finer than ``resolution`` of the column's spread."""
    scale = float(np.std(real)) if real.size >= 2 else 0.0
    if not (scale > 0 and math.isfinite(scale)):
        finite = real[np.isfinite(real)] if real.size else real
        scale = float(np.max(np.abs(finite))) if finite.size else 0.0
        scale = scale if scale > 0 and math.isfinite(scale) else 1.0
    exponent = math.ceil(math.log10(resolution * scale) - 1e-12)
    return 10.0**exponent


def answer_points(
    points: Sequence[Point],
    real_sorted: np.ndarray,
    *,
    fence: tuple[float, float],
    state: CutState,
    key_prefix: str,
    min_count: int,
    cell_threshold: int,
) -> tuple[list[int | None], list[str]]:
    """The real-value rank of every point, or None where the rules withhold it, and the reasons.

    ``points`` must already be snapped. ``fence``: the column's noisy (outward) range: a point
    outside it is answered (0 or n) without being a cut. ``state`` is updated in place.
    """
    n = int(real_sorted.size)
    edge = max(min_count, cell_threshold)
    ranks: list[int | None] = [None] * len(points)
    reasons: list[str] = []
    order = sorted(range(len(points)), key=lambda i: (points[i].value, points[i].side == RIGHT))
    stored = sorted(state.ranks)
    for i in order:
        p = points[i]
        key = f"{key_prefix}|{p.side}|{p.value!r}"
        if key not in state.points:
            if state.remaining <= 0:
                reasons.append("threshold_allowance")
                continue
            state.remaining -= 1
            state.points.add(key)
            state.new_points.add(key)
        if p.value < fence[0] or (p.value <= fence[0] and p.side == LEFT):
            ranks[i] = 0
            continue
        if p.value > fence[1] or (p.value >= fence[1] and p.side == RIGHT):
            ranks[i] = n
            continue
        r = int(np.searchsorted(real_sorted, p.value, side="left" if p.side == LEFT else "right"))
        if r < edge or n - r < edge:
            reasons.append("min_count")
            continue
        j = bisect.bisect_left(stored, r)
        if not (j < len(stored) and stored[j] == r):
            if (j > 0 and r - stored[j - 1] < cell_threshold) or (j < len(stored) and stored[j] - r < cell_threshold):
                reasons.append("cell_threshold")
                continue
            stored.insert(j, r)
            state.ranks.add(r)
            state.new_ranks.add(r)
        ranks[i] = r
    return ranks, reasons
