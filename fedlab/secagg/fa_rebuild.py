"""The researcher's half of :mod:`.fa_layout`: from the exact sums back to replies the plain merge pools.

:func:`rebuild_replies` gives the summed figures under ``SECURE_SUM`` and, per node, a figure-free reply
with its marks (withheld cells), so that the merge reports a withheld cell as it does in the clear; the
one-reply :func:`rebuild` marks every cell any node withheld as withheld by the nodes together. What the
researcher learns per cell is said in :mod:`.fa_layout`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction

import msgspec

from fedlab.analytics.messages import (
    CategoricalPartial,
    CovariancePartial,
    CrosstabPartial,
    FAReply,
    NumericPartial,
)
from fedlab.errors import FedlabSecaggError
from fedlab.secagg.fa_layout import _ULP, SECURE_SUM, FALayout, _answered, _crosstab, _histogram, skeleton

__all__ = ["rebuild", "rebuild_replies"]



class _Sums:
    """The summed vector, read in layout order."""

    def __init__(self, sums: Sequence[Fraction | int]) -> None:
        self._it: Iterator[Fraction | int] = iter(sums)

    def value(self) -> Fraction:
        return Fraction(next(self._it))

    def values(self, k: int) -> list[Fraction]:
        return [self.value() for _ in range(k)]

    def count(self, what: str) -> int:
        v = self.value()
        if v.denominator != 1 or v < 0:
            raise FedlabSecaggError(
                f"the secure sum of {what} is not a count: the masks did not cancel (a node masked a vector of "
                "another layout or session, or the unmasking went wrong); ask again")
        return int(v)

    def counts(self, k: int, what: str) -> list[int]:
        return [self.count(what) for _ in range(k)]


def rebuild(layout: FALayout, sums: Sequence[Fraction], skeletons: Mapping[str, FAReply]) -> FAReply:
    """One reply holding the pooled figures, for ``merge_*({SECURE_SUM: rebuild(...)})``.

    A cell any node withheld is ``None`` (see the module docstring); :func:`rebuild_replies` instead
    reproduces the plain merge's lower bounds with the withholding nodes named.
    ``skeletons``: the layout-phase replies of exactly the nodes whose vectors are in ``sums``.
    """
    pooled = _pool(layout, sums, skeletons)
    nodes = sorted(skeletons.items())
    numeric = dict(pooled.numeric)
    for column, edges in layout.histograms.items():
        hidden = {b for _, r in nodes for b in _marked_bins(r, column, edges)}
        p = numeric[column]
        assert p.histogram is not None
        numeric[column] = msgspec.structs.replace(
            p, histogram=[None if b in hidden else v for b, v in enumerate(p.histogram)])
    categorical = {}
    for column, cp in pooled.categorical.items():
        holders = [r.categorical[column] for _, r in nodes if column in r.categorical]
        hidden_levels = {v for h in holders for v, n in h.value_counts.items() if n is None}
        hidden_levels |= {v for h in holders if h.suppressed_levels for v in layout.categorical[column]
                          if v not in h.value_counts}
        categorical[column] = msgspec.structs.replace(
            cp, value_counts={v: None if v in hidden_levels else n for v, n in cp.value_counts.items()},
            suppressed_levels=sum(int(h.suppressed_levels) for h in holders))
    crosstab = pooled.crosstab
    if crosstab is not None:
        hidden_cells = {(r, c) for _, s in nodes if (t := _crosstab(s, layout)) is not None
                        for r, line in t.cells.items() for c, n in line.items() if n is None}
        crosstab = msgspec.structs.replace(crosstab, cells={r: {c: None if (r, c) in hidden_cells else n
                                                                 for c, n in line.items()}
                                                             for r, line in crosstab.cells.items()})
    refused: dict[str, list[str]] = {}
    for node, r in nodes:
        for key, why in r.refused.items():
            refused.setdefault(key, []).append(f"{node}: {why}")
    return msgspec.structs.replace(pooled, numeric=numeric, categorical=categorical, crosstab=crosstab,
                                   refused={k: "; ".join(v) for k, v in sorted(refused.items())})


def rebuild_replies(layout: FALayout, sums: Sequence[Fraction], skeletons: Mapping[str, FAReply], *,
                    key: str = SECURE_SUM) -> dict[str, FAReply]:
    """Replies whose plain merge is that of the nodes' plain replies: the pooled figures under ``key``
    (disclosed counts summed), and per node a reply with no figure but its marks (what it withheld).

    Counts and the list of who withheld what come out exactly as the plain merge makes them; moments as
    the exact pooled figures. Only the covariance is in ``key``'s reply alone (it has no marks).
    """
    if key in skeletons:
        raise FedlabSecaggError(f"a node is called {key!r}, the name of the summed reply; rename it")
    pooled = _pool(layout, sums, skeletons)
    nodes = sorted(skeletons.items())
    disclosed_levels = {c: {v for _, r in nodes if c in r.categorical
                            for v, n in r.categorical[c].value_counts.items() if n is not None}
                        for c in layout.categorical}
    categorical = {c: msgspec.structs.replace(cp, value_counts={v: n for v, n in cp.value_counts.items()
                                                                if v in disclosed_levels[c]})
                   for c, cp in pooled.categorical.items()}
    crosstab = pooled.crosstab
    if crosstab is not None:
        disclosed = {(r, c) for _, s in nodes if (t := _crosstab(s, layout)) is not None
                     for r, line in t.cells.items() for c, n in line.items() if n is not None}
        crosstab = msgspec.structs.replace(crosstab, cells={
            r: kept for r, line in crosstab.cells.items() if (kept := {c: n for c, n in line.items()
                                                                      if (r, c) in disclosed})})
    out = {key: msgspec.structs.replace(pooled, categorical=categorical, crosstab=crosstab)}
    for node, reply in nodes:
        out[node] = _marks(reply, layout)
    return out


def _marked_bins(reply: FAReply, column: str, edges: Sequence[float]) -> list[int]:
    """The bins of ``column`` a node withheld: those it sent as None, or all if it has the column but
    sent no histogram over these edges (the plain merge reads a node with values that way)."""
    if column not in reply.numeric:
        return []
    bins = _histogram(reply, column, edges)
    return list(range(len(edges) - 1)) if bins is None else [b for b, v in enumerate(bins) if v is None]


def _marks(reply: FAReply, layout: FALayout) -> FAReply:
    """A node's skeleton cut to the layout: zeros, its None marks, and no covariance (it has no marks,
    and its columns may be fewer than the layout's, which the merge would not take)."""
    bare = skeleton(reply)
    numeric = {}
    for column, p in bare.numeric.items():
        edges = layout.histograms.get(column)
        hidden = set(_marked_bins(reply, column, edges)) if edges is not None else set()
        numeric[column] = msgspec.structs.replace(
            p, histogram_edges=None if edges is None else list(edges),
            histogram=None if edges is None else [None if b in hidden else 0 for b in range(len(edges) - 1)])
    table = _crosstab(bare, layout)
    return msgspec.structs.replace(bare, numeric=numeric, crosstab=table, covariance=None)


def _pool(layout: FALayout, sums: Sequence[Fraction], skeletons: Mapping[str, FAReply]) -> FAReply:
    """The pooled reply with every disclosed sum (no None), and each column's smallest allowance."""
    if len(sums) != layout.size:
        raise FedlabSecaggError(f"the secure sum holds {len(sums)} values, the layout {layout.size}; ask again")
    nodes = sorted(skeletons.items())
    k = max(len(nodes), 1)
    read = _Sums(sums)
    n_rows = read.count("the number of rows")
    answered = read.count("the cells answered")
    expected = sum(_answered(r, layout) for _, r in nodes)
    if answered != expected:
        raise FedlabSecaggError(
            f"the nodes' masked answers cover {answered} columns and cells, their skeletons {expected}: a node's "
            "answer changed between the two requests (its data, or what its rules let out); ask again")
    moments = {}
    for column in layout.numeric:
        count, missing = read.counts(2, f"the count of {column!r}")
        total, m2, w, t = read.values(4)
        moments[column] = (count, missing, total, m2, w, t)
    hist = {column: read.counts(len(edges) - 1, f"the histogram of {column!r}")
            for column, edges in layout.histograms.items()}
    numeric = {}
    for column, (count, missing, total, m2, w, t) in moments.items():
        edges = layout.histograms.get(column)
        numeric[column] = NumericPartial(
            count=count, missing=missing, sum=float(total), mean=float(w / count) if count else 0.0,
            m2=float(_pooled_m2(count, m2, t, w, k)), histogram_edges=None if edges is None else list(edges),
            histogram=list(hist[column]) if column in hist else None)
    categorical = {}
    for column, levels in layout.categorical.items():
        count, missing = read.counts(2, f"the count of {column!r}")
        values = read.counts(len(levels), f"the value counts of {column!r}")
        categorical[column] = CategoricalPartial(count=count, missing=missing,
                                                 value_counts=dict(zip(levels, values, strict=True)))
    crosstab = None
    if layout.crosstab:
        cells: dict[str, dict[str, int | None]] = {
            r: dict(zip(cols, read.counts(len(cols), "the crosstab"), strict=True)) for r, cols in layout.cells.items()}
        crosstab = CrosstabPartial(rows=layout.crosstab[0], cols=layout.crosstab[1], cells=cells)
    covariance = _pooled_covariance(read, layout.covariance, k) if layout.covariance else None
    ids = {r.dataset_id for _, r in nodes}
    allowance: dict[str, int] = {}
    for _, r in nodes:
        for column, left in r.allowance.items():
            allowance[column] = min(left, allowance.get(column, left))
    return FAReply(dataset_id=ids.pop() if len(ids) == 1 else "secure sum", n_rows=n_rows, numeric=numeric,
                   categorical=categorical, crosstab=crosstab, covariance=covariance,
                   allowance=dict(sorted(allowance.items())))


def _pooled_m2(n: int, m2: Fraction, t: Fraction, w: Fraction, k: int) -> Fraction:
    """``sum(m2_k) + sum(n_k mean_k**2) - (sum(n_k mean_k))**2 / n``; 0 within the encoding's rounding
    of 0 (``k`` slots of each of m2, T and W rounded by up to half of 2**-64)."""
    if not n:
        return Fraction(0)
    value = m2 + t - w * w / n
    return value if value > k * _ULP * (1 + abs(w) / n) else Fraction(0)


def _pooled_covariance(read: _Sums, columns: Sequence[str], k: int) -> CovariancePartial:
    p = len(columns)
    n = [[0] * p for _ in range(p)]
    mx, my, m2x, m2y, cm = ([[0.0] * p for _ in range(p)] for _ in range(5))
    for i in range(p):
        for j in range(i, p):
            what = f"the covariance of {columns[i]!r} and {columns[j]!r}"
            if i == j:
                count = read.count(what)
                w, m2, t = read.values(3)
                m2_x = m2_y = _pooled_m2(count, m2, t, w, k)
                wx = wy = w
                co = m2_x
            else:
                count = read.count(what)
                wx, wy, s_m2x, s_m2y, s_c, tx, ty, txy = read.values(8)
                m2_x, m2_y = _pooled_m2(count, s_m2x, tx, wx, k), _pooled_m2(count, s_m2y, ty, wy, k)
                # no co-moment with a column without spread (|c| <= sqrt(m2_x * m2_y))
                co = s_c + txy - wx * wy / count if count and m2_x and m2_y else Fraction(0)
            mean_x = float(wx / count) if count else 0.0
            mean_y = float(wy / count) if count else 0.0
            n[i][j] = n[j][i] = count
            cm[i][j] = cm[j][i] = float(co)
            mx[i][j], my[i][j], m2x[i][j], m2y[i][j] = mean_x, mean_y, float(m2_x), float(m2_y)
            mx[j][i], my[j][i], m2x[j][i], m2y[j][i] = mean_y, mean_x, float(m2_y), float(m2_x)
    return CovariancePartial(columns=list(columns), n=n, mean_x=mx, mean_y=my, m2_x=m2x, m2_y=m2y, c=cm)
