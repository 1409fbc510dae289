"""Merging the partials of several nodes into the statistic over all their rows.

Every merge takes ``{node_id: partial}`` so that what a node suppressed (``None`` on the wire)
can be attributed to it: merged counts are sums of the *disclosed* counts, and each merged
result says which nodes withheld which cell. A count below a quantile threshold is only known
where every node holding values gave it (else it is None); a value-count level that a node may
have withheld without naming it (``CategoricalPartial.suppressed_levels``) lists that node too.

Results do not depend on the order of the nodes, not even in the last bit: nodes are visited
sorted by id, sums use :func:`math.fsum`, and moments are combined all at once with the k-way
form of Chan et al.'s parallel formula (deviations from the pooled mean, see
:func:`merge_moments`) rather than pairwise in arrival order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from fedlab.analytics.messages import CategoricalPartial, CovariancePartial, CrosstabPartial, NumericPartial
from fedlab.errors import FedlabProtocolError

__all__ = [
    "MergedCategorical",
    "MergedCrosstab",
    "MergedNumeric",
    "merge_categorical",
    "merge_covariance",
    "merge_crosstab",
    "merge_moments",
    "merge_numeric",
]


@dataclass(frozen=True)
class MergedNumeric:
    """A numeric column over all nodes. ``var``/``std`` use ddof=1 (NaN below 2 values).

    ``min``/``max`` are None unless every node holding values sent one. ``histogram`` sums the
    disclosed counts; ``histogram_suppressed[bin]`` lists the nodes that withheld that bin.
    ``below`` sums the counts below each quantile threshold, None where some node withheld it.
    """

    count: int
    missing: int
    sum: float
    mean: float
    var: float
    std: float
    min: float | None
    max: float | None
    histogram_edges: list[float] | None
    histogram: list[int] | None
    histogram_suppressed: dict[int, list[str]]
    below: list[int | None] | None


@dataclass(frozen=True)
class MergedCategorical:
    """Value counts over all nodes (sums of the disclosed counts).

    ``suppressed[value]`` lists the nodes whose count of that value is not in the sum: nodes
    that sent it as None (older nodes; a value no node disclosed appears only there), and nodes
    that withheld some levels without naming them and did not name this one (they may hold
    it): where ``suppressed`` lists a node, the count is a lower bound. ``withheld_levels``:
    node -> how many levels it withheld (nodes that withheld none are left out).
    """

    count: int
    missing: int
    value_counts: dict[str, int]
    suppressed: dict[str, list[str]]
    withheld_levels: dict[str, int] = field(default_factory=dict)

    def to_series(self) -> pd.Series:
        """The counts as a Series, most frequent first (ties by value), like ``value_counts``."""
        items = sorted(self.value_counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return pd.Series([n for _, n in items], index=pd.Index([k for k, _ in items]),
                         dtype=np.int64, name="count")


@dataclass(frozen=True)
class MergedCrosstab:
    """A two-way table over all nodes: ``table.loc[row_value, col_value]`` is the disclosed count."""

    rows: str
    cols: str
    table: pd.DataFrame
    suppressed: dict[tuple[str, str], list[str]]


def _fsum(values: Iterable[float] | np.ndarray) -> float:
    """Correctly rounded sum; falls back to numpy where fsum refuses (inf - inf, overflow)."""
    items = values.tolist() if isinstance(values, np.ndarray) else list(values)
    try:
        return math.fsum(items)
    except (OverflowError, ValueError):
        with np.errstate(all="ignore"):
            return float(np.sum(np.asarray(items, dtype=np.float64)))


def merge_moments(parts: Sequence[tuple[int, float, float]]) -> tuple[int, float, float]:
    """Combine ``(n, mean, M2)`` triples into the triple of the pooled values.

    ``M2 = sum(M2_k) + sum(n_k * (mean_k - mean)**2)`` with the pooled ``mean`` — Chan et al.'s
    pairwise update applied to all parts at once, which fsum makes independent of their order.
    Parts with ``n == 0`` are ignored; no values at all gives ``(0, nan, 0.0)``.
    """
    used = [(int(n), float(mean), float(m2)) for n, mean, m2 in parts if n]
    total = sum(n for n, _, _ in used)
    if total == 0:
        return 0, math.nan, 0.0
    means = {mean for _, mean, _ in used}
    with np.errstate(all="ignore"):
        mean = means.pop() if len(means) == 1 else _fsum(n * m for n, m, _ in used) / total
        m2 = _fsum(m2 for _, _, m2 in used) + _fsum(n * (m - mean) ** 2 for n, m, _ in used)
    return total, mean, m2


def merge_numeric(partials: Mapping[str, NumericPartial]) -> MergedNumeric:
    """Pool numeric partials; raises FedlabProtocolError if nodes used different histogram edges."""
    nodes = sorted(partials.items())
    count, mean, m2 = merge_moments([(p.count, p.mean, p.m2) for _, p in nodes])
    var = m2 / (count - 1) if count >= 2 else math.nan
    holders = [p for _, p in nodes if p.count]
    lows = [p.min for p in holders]
    highs = [p.max for p in holders]
    edges, histogram, suppressed = _merge_histograms(nodes)
    return MergedNumeric(
        count=count,
        missing=sum(p.missing for _, p in nodes),
        sum=_fsum(p.sum for _, p in nodes),
        mean=mean,
        var=var,
        std=math.sqrt(var) if var >= 0 else math.nan,
        min=min(v for v in lows if v is not None) if holders and None not in lows else None,
        max=max(v for v in highs if v is not None) if holders and None not in highs else None,
        histogram_edges=edges,
        histogram=histogram,
        histogram_suppressed=suppressed,
        below=_merge_below(nodes),
    )


def merge_categorical(partials: Mapping[str, CategoricalPartial]) -> MergedCategorical:
    """Pool value counts: disclosed counts are summed, withheld ones attributed to their node.

    A node that withheld levels (``suppressed_levels > 0``) does not name them, so every level
    that other nodes named and it did not is listed under ``suppressed`` for it as well.
    """
    nodes = sorted(partials.items())
    counts: dict[str, int] = {}
    suppressed: dict[str, list[str]] = {}
    for node, p in nodes:
        for value, n in p.value_counts.items():
            if n is None:
                suppressed.setdefault(value, []).append(node)
            else:
                counts[value] = counts.get(value, 0) + n
    withheld = {node: int(p.suppressed_levels) for node, p in nodes if p.suppressed_levels > 0}
    named = set(counts) | set(suppressed)
    for node, p in nodes:
        if node in withheld:
            for value in sorted(named - set(p.value_counts)):
                suppressed.setdefault(value, []).append(node)
    suppressed = {value: sorted(who) for value, who in sorted(suppressed.items())}
    return MergedCategorical(count=sum(p.count for _, p in nodes), missing=sum(p.missing for _, p in nodes),
                             value_counts=dict(sorted(counts.items())), suppressed=suppressed,
                             withheld_levels=withheld)


def merge_crosstab(partials: Mapping[str, CrosstabPartial]) -> MergedCrosstab:
    """Pool two-way tables; rows and columns are the values any node disclosed, sorted."""
    nodes = sorted(partials.items())
    rows, cols = _same("crosstab", nodes, lambda p: (p.rows, p.cols))
    counts: dict[tuple[str, str], int] = {}
    suppressed: dict[tuple[str, str], list[str]] = {}
    for node, p in nodes:
        for rv, line in p.cells.items():
            for cv, n in line.items():
                if n is None:
                    suppressed.setdefault((rv, cv), []).append(node)
                else:
                    counts[(rv, cv)] = counts.get((rv, cv), 0) + n
    index = sorted({r for r, _ in counts})
    columns = sorted({c for _, c in counts})
    table = pd.DataFrame(0, index=pd.Index(index, name=rows),
                         columns=pd.Index(columns, name=cols), dtype=np.int64)
    for (rv, cv), n in counts.items():
        table.loc[rv, cv] = n
    return MergedCrosstab(rows=rows, cols=cols, table=table, suppressed=dict(sorted(suppressed.items())))


def merge_covariance(partials: Mapping[str, CovariancePartial]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pool co-moments into ``(cov, corr)`` DataFrames like pandas' pairwise-complete ones.

    ``cov`` has ddof=1 and is NaN where fewer than 2 rows hold both columns; ``corr`` is also
    NaN where either variance is 0, and is clipped to [-1, 1] against rounding.
    """
    nodes = sorted(partials.items())
    (columns,) = _same("covariance", nodes, lambda p: (tuple(p.columns),))
    k = len(columns)
    cov = np.full((k, k), np.nan)
    corr = np.full((k, k), np.nan)
    for i in range(k):
        for j in range(i, k):
            parts = [p for _, p in nodes if p.n[i][j]]
            n, mx, m2x = merge_moments([(p.n[i][j], p.mean_x[i][j], p.m2_x[i][j]) for p in parts])
            _, my, m2y = merge_moments([(p.n[i][j], p.mean_y[i][j], p.m2_y[i][j]) for p in parts])
            with np.errstate(all="ignore"):
                c = m2x if i == j else (_fsum(p.c[i][j] for p in parts) + _fsum(
                    p.n[i][j] * (p.mean_x[i][j] - mx) * (p.mean_y[i][j] - my) for p in parts))
                if n >= 2:
                    cov[i, j] = cov[j, i] = c / (n - 1)
                    scale = math.sqrt(m2x) * math.sqrt(m2y)  # no underflow of m2x * m2y
                    if scale > 0:
                        corr[i, j] = corr[j, i] = 1.0 if i == j else max(-1.0, min(1.0, c / scale))
    index = pd.Index(list(columns))
    return pd.DataFrame(cov, index=index, columns=index), pd.DataFrame(corr, index=index, columns=index)


def _same(what: str, nodes: Sequence[tuple[str, Any]], key: Callable[[Any], tuple[Any, ...]]) -> tuple[Any, ...]:
    """The value of ``key`` that every node's partial must share (column names, edges...)."""
    if not nodes:
        raise FedlabProtocolError(f"no node sent a {what} to merge", code="no_partials")
    seen = {node: key(p) for node, p in nodes}
    if len(set(seen.values())) > 1:
        raise FedlabProtocolError(f"nodes sent {what}s of different shapes, cannot merge them: {seen}",
                                  code="inconsistent_partials", field=what)
    return seen[nodes[0][0]]


def _merge_histograms(
    nodes: Sequence[tuple[str, NumericPartial]],
) -> tuple[list[float] | None, list[int] | None, dict[int, list[str]]]:
    """Sum disclosed bins. A node holding values that sent no histogram withheld every bin."""
    senders = [(node, p) for node, p in nodes if p.histogram_edges is not None]
    if not senders:
        return None, None, {}
    (edges,) = _same("histogram", senders, lambda p: (tuple(p.histogram_edges),))
    bins = len(edges) - 1
    histogram = [0] * bins
    suppressed: dict[int, list[str]] = {}
    for node, p in nodes:
        if p.histogram is None or p.histogram_edges is None:
            counts: Sequence[int | None] = [None] * bins if p.count else [0] * bins
        elif len(p.histogram) != bins:
            raise FedlabProtocolError(f"node {node} sent {len(p.histogram)} histogram counts for {bins} bins",
                                      code="inconsistent_partials", field="histogram")
        else:
            counts = p.histogram
        for b, n in enumerate(counts):
            if n is None:
                suppressed.setdefault(b, []).append(node)
            else:
                histogram[b] += n
    return list(edges), histogram, suppressed


def _merge_below(nodes: Sequence[tuple[str, NumericPartial]]) -> list[int | None] | None:
    """Sum the counts below thresholds, None at a threshold where some node withheld its count;
    every node holding values must have sent its list (withheld entries as None)."""
    senders = [(node, p) for node, p in nodes if p.below is not None]
    if not senders:
        return None
    (size,) = _same("threshold count", senders, lambda p: (len(p.below),))
    below: list[int | None] = [0] * size
    for node, p in nodes:
        if p.below is None:
            if p.count:
                raise FedlabProtocolError(f"node {node} sent no counts below the quantile thresholds",
                                          code="inconsistent_partials", field="below")
            continue
        below = [None if a is None or b is None else a + b for a, b in zip(below, p.below, strict=True)]
    return below
