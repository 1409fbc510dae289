"""The node's differentially private answer to an FARequest that carries ``dp`` (a DPQuery).

Which queries a request makes, per column (each is one release of :mod:`fedlab.privacy.dp_mechanisms`):

* ``count`` / ``missing``: always, one query ``col.count`` (rows with a value, rows without);
* ``sum`` / ``mean``: ``col.sum``, the sum of the values clamped to the column's bounds and centred on
  their midpoint c (OpenDP's sensitivity for it is the bounds' width, hi - lo);
* ``var`` / ``std``: also ``col.sumsq``, the sum of the squared centred values (sensitivity r², r the
  half-width: a quarter of what uncentred squares would need when lo = 0);
* ``histogram``: ``col.histogram``, counts on the researcher's edges (values outside are not counted);
* ``quantiles`` / ``median``: ``col.quantiles``, counts on a grid of ``dp.quantile_bins`` bins over the
  bounds; the researcher reads the quantiles from the nodes' summed counts (a DP histogram method,
  not a search over exact counts);
* ``value_counts``: ``col.value_counts``, counts of the column's public categories and ``<other>``;
* ``crosstab``: one query over the pairs of both columns' public categories.

Bounds and categories are the operator's (``[privacy.bounds]``, ``[privacy.categories]``) or else the
researcher's; a figure without them is refused for that column, never answered with bounds drawn from
the data. ``min``, ``max``, ``cov`` and ``corr`` are not released with DP (refused).

The other disclosure rules (min_count, suppression, cut state) are not applied to a DP answer: its noise
is the protection, and a refusal that depends on the data would itself leak. Excluded columns stay
refused. The request's ε is split over its queries; the cost is checked against this researcher's budget
on the dataset's *source* before anything is computed, and spent, checked again, in one transaction after
the noise is drawn and before the reply leaves (:mod:`fedlab.node.dp_ledger`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fedlab.analytics.disclosure import check_enabled
from fedlab.analytics.messages import CategoricalPartial, CrosstabPartial, FAReply, FARequest, NumericPartial
from fedlab.analytics.partials import MISSING_KEY, is_numeric
from fedlab.errors import FedlabDisclosureError, FedlabProtocolError
from fedlab.node.dp_ledger import DPLedger, source_key
from fedlab.privacy import dp_mechanisms as mech
from fedlab.protocol.dp_messages import DPQuery, DPSpent

if TYPE_CHECKING:
    from fedlab.node.analytics_handler import AnalyticsHandler
    from fedlab.node.dataset_view import LoadedData

__all__ = ["answer_dp"]

_MOMENTS = {"sum", "mean", "var", "std"}
_SQUARES = {"var", "std"}
_QUANTILES = {"quantiles", "median"}
_NOT_DP = {"min", "max", "cov", "corr"}
_NUMERIC_ONLY = _MOMENTS | _QUANTILES | {"histogram", "min", "max"}
_SEP = "\x1f"


def answer_dp(request: FARequest, analytics: AnalyticsHandler, ledger: DPLedger, *, peer: str,
              msg_id: str) -> FAReply:
    """Noisy partials for ``request``, paid for from ``peer``'s budget on the dataset's source."""
    query = request.dp
    assert query is not None
    check_enabled(analytics.rules)
    analytics.check_stats(request)
    if request.thresholds:
        raise FedlabProtocolError("a DP request does not take quantile thresholds: ask for 'quantiles' with epsilon "
                                  "and bounds, and the node answers counts on a grid", code="invalid_field",
                                  field="thresholds")
    if query.mechanism == mech.GAUSSIAN and not query.delta > 0:
        raise FedlabDisclosureError("the Gaussian mechanism needs a delta > 0 (e.g. delta=1e-7); or use 'laplace'")
    if query.mechanism == mech.LAPLACE and query.delta:
        raise FedlabDisclosureError("the Laplace mechanism spends no delta; send delta=0, or use 'gaussian'")
    record = analytics.registry.get(request.dataset_id)
    data = analytics.load(record)
    source, dataset = source_key(data.root), data.root.name
    what = f"this request (epsilon={query.epsilon:g})"
    with ledger.spending(peer, source, dataset) as spending:  # refuse before any work when it cannot fit
        spending.check(query.epsilon, query.delta, what)
    plan = _Plan(request, query, analytics, data)
    released = mech.release(plan.queries, epsilon=query.epsilon, delta=query.delta, mechanism=query.mechanism)
    reply = plan.reply(released, record.dataset_id)
    with ledger.spending(peer, source, dataset) as spending:  # the answer leaves only once this commits
        balance = spending.spend(epsilon=released.epsilon, delta=released.delta, kind="analytics",
                                 label=request.dataset_id, msg_id=msg_id, what=what,
                                 detail={"mechanism": query.mechanism, "queries": sorted(released.scales)})
    spent = DPSpent(epsilon=released.epsilon, delta=released.delta, mechanism=query.mechanism, balance=balance,
                    noise=released.scales, bounds={c: [lo, hi] for c, (lo, hi) in plan.bounds_used.items()})
    return FAReply(dataset_id=reply.dataset_id, n_rows=reply.n_rows, numeric=reply.numeric,
                   categorical=reply.categorical, crosstab=reply.crosstab, refused=reply.refused, dp=spent)


class _Plan:
    """The queries of one DP request, and how their noisy figures become partials."""

    def __init__(self, request: FARequest, query: DPQuery, analytics: AnalyticsHandler, data: LoadedData) -> None:
        self.request, self.dp, self.analytics, self.data = request, query, analytics, data
        self.queries: list[mech.Query] = []
        self.refused: dict[str, str] = {}
        self.bounds_used: dict[str, tuple[float, float]] = {}
        self.columns: dict[str, _Column] = {}
        self.crosstab_pair: tuple[str, str, list[str], list[str]] | None = None
        asked_tables = set(request.stats) & _NOT_DP
        for stat in sorted(asked_tables & {"cov", "corr"}):
            self.refused[stat] = (f"{stat} is not released with differential privacy by this node; ask for DP "
                                  "means and variances, or exact statistics from a node without require_dp")
        for column in analytics._columns(request, data):
            self._column(column)
        if request.crosstab:
            self._crosstab()

    # -- what the operator and the researcher declared ------------------------------------------
    def _bounds(self, column: str) -> tuple[float, float] | None:
        declared = self.analytics.dp_rules.bounds.get(column)
        if declared is not None:
            return declared
        given = self.dp.bounds.get(column)
        if given is None:
            return None
        lo, hi = float(given[0]), float(given[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise FedlabProtocolError(f"bounds of {column!r} must be finite with lo < hi, got {list(given)}",
                                      code="invalid_field", field="dp.bounds")
        return lo, hi

    def _categories(self, column: str) -> list[str] | None:
        declared = self.analytics.dp_rules.categories.get(column)
        if declared is not None:
            return list(declared)
        given = self.dp.categories.get(column)
        return list(dict.fromkeys(given)) if given else None

    # -- per column -----------------------------------------------------------------------------
    def _column(self, column: str) -> None:
        if self.analytics._excluded(self.data, column):
            self.refused[column] = ("excluded by the node's operator (disclosure.excluded_columns), or made from "
                                    "such a column")
            return
        series = self.data.frame[column]
        stats = set(self.analytics._stats_for(self.request, column)) | {"count"}
        numeric = is_numeric(series)
        spec = _Column(column, numeric)
        self.columns[column] = spec
        present = series.notna().to_numpy()
        self._add(spec, "count", mech.count_query(f"{column}.count", present))
        for stat in sorted(stats & {"min", "max"}):
            self.refused[f"{column}.{stat}"] = (
                f"{stat} is not released with differential privacy (one row decides it); ask for DP quantiles, "
                "e.g. levels 0.01 and 0.99, instead")
        if not numeric:
            for stat in sorted(stats & (_NUMERIC_ONLY - {"min", "max"})):
                self.refused[f"{column}.{stat}"] = f"{column} is not numeric"
        values = _floats(series[present]) if numeric else np.empty(0)
        if numeric and stats & (_MOMENTS | _QUANTILES):
            bounds = self._bounds(column)
            if bounds is None:
                self.refused[f"{column}.bounds"] = (
                    f"a DP {'/'.join(sorted(stats & (_MOMENTS | _QUANTILES)))} of {column} needs clamp bounds, "
                    f"declared by the node's operator ([privacy.bounds]) or sent with the request: bounds="
                    f"{{{column!r}: (lo, hi)}} from what the column can hold, never from its data")
            else:
                self._moments_and_grid(spec, stats, values, bounds)
        if numeric and "histogram" in stats:
            self._histogram(spec, values)
        if "value_counts" in stats:
            self._value_counts(spec, series, present)

    def _moments_and_grid(self, spec: _Column, stats: set[str], values: np.ndarray,
                          bounds: tuple[float, float]) -> None:
        lo, hi = bounds
        self.bounds_used[spec.name] = bounds
        spec.center, spec.radius = (lo + hi) / 2.0, (hi - lo) / 2.0
        centred = np.clip(values, lo, hi) - spec.center
        if stats & _MOMENTS:
            self._add(spec, "sum", mech.sum_query(f"{spec.name}.sum", centred, -spec.radius, spec.radius))
        if stats & _SQUARES:
            self._add(spec, "sumsq", mech.sum_query(f"{spec.name}.sumsq", centred**2, 0.0, spec.radius**2))
        if stats & _QUANTILES:
            n_bins = self.dp.quantile_bins
            spec.grid = np.linspace(lo, hi, n_bins + 1)
            index = np.clip(np.floor((np.clip(values, lo, hi) - lo) / (hi - lo) * n_bins), 0, n_bins - 1)
            self._add(spec, "quantiles", mech.histogram_query(f"{spec.name}.quantiles", index.astype(np.int64),
                                                              n_bins))

    def _histogram(self, spec: _Column, values: np.ndarray) -> None:
        args = self.request.stats_args.get(spec.name, {}).get("histogram", {})
        edges = args.get("edges") if isinstance(args, Mapping) else None
        if not isinstance(edges, list) or len(edges) < 2:
            self.refused[f"{spec.name}.histogram"] = (
                "a DP histogram needs explicit edges (a bin count would need the data's range): "
                f"stats_args={{{spec.name!r}: {{'histogram': {{'edges': [0, 10, 20]}}}}}}")
            return
        try:
            checked = np.asarray([float(e) for e in edges], dtype=np.float64)
        except (TypeError, ValueError):
            checked = np.asarray([math.nan])
        if checked.size > self.analytics.rules.max_thresholds or not (
                np.all(np.isfinite(checked)) and np.all(np.diff(checked) > 0)):
            raise FedlabProtocolError(
                f"histogram edges of {spec.name!r} must be finite and increasing, at most "
                f"{self.analytics.rules.max_thresholds} of them (disclosure.max_thresholds)",
                code="invalid_field", field="stats_args")
        index = np.searchsorted(checked, values, side="right") - 1
        index[values == checked[-1]] = checked.size - 2  # the last bin is closed, as numpy.histogram's
        index[(values < checked[0]) | (values > checked[-1])] = -1
        spec.edges = checked
        self._add(spec, "histogram", mech.histogram_query(f"{spec.name}.histogram", index, checked.size - 1))

    def _value_counts(self, spec: _Column, series: pd.Series, present: np.ndarray) -> None:
        categories = self._categories(spec.name)
        if categories is None:
            self.refused[f"{spec.name}.value_counts"] = (
                f"a DP value_counts of {spec.name} needs its public categories, declared by the node's operator "
                f"([privacy.categories]) or sent with the request: categories={{{spec.name!r}: ['a', 'b']}}; "
                "other values are counted together as '<other>'")
            return
        args = self.request.stats_args.get(spec.name, {}).get("value_counts", {})
        dropna = bool(args.get("dropna", True)) if isinstance(args, Mapping) else True
        labels = _as_str(series[present])
        if not dropna:
            labels = labels + [MISSING_KEY] * int((~present).sum())
            categories = [*categories, MISSING_KEY] if MISSING_KEY not in categories else categories
        spec.categories = categories
        self._add(spec, "value_counts", mech.categories_query(f"{spec.name}.value_counts", labels, categories))

    def _crosstab(self) -> None:
        if len(self.request.crosstab) != 2:
            raise FedlabProtocolError("a crosstab needs exactly two columns", code="invalid_field", field="crosstab")
        rows, cols = self.request.crosstab
        for column in (rows, cols):
            if self.analytics._excluded(self.data, column):
                self.refused["crosstab"] = f"excluded by the node's operator (disclosure.excluded_columns): {column}"
                return
        row_levels, col_levels = self._categories(rows), self._categories(cols)
        if row_levels is None or col_levels is None:
            self.refused["crosstab"] = (
                "a DP crosstab needs the public categories of both columns, declared by the node's operator "
                "([privacy.categories]) or sent with the request: categories={'a': [...], 'b': [...]}")
            return
        frame = self.data.frame
        both = frame[rows].notna().to_numpy() & frame[cols].notna().to_numpy()
        labels = [f"{r}{_SEP}{c}" for r, c in zip(_as_str(frame[rows][both]), _as_str(frame[cols][both]),
                                                   strict=True)]
        pairs = [f"{r}{_SEP}{c}" for r in row_levels for c in col_levels]
        self.crosstab_pair = (rows, cols, row_levels, col_levels)
        self.queries.append(mech.categories_query("crosstab", labels, pairs))

    def _add(self, spec: _Column, kind: str, query: mech.Query) -> None:
        spec.kinds.append(kind)
        self.queries.append(query)

    # -- the noisy figures as partials ----------------------------------------------------------
    def reply(self, released: mech.Released, dataset_id: str) -> FAReply:
        values = released.values
        numeric: dict[str, NumericPartial] = {}
        categorical: dict[str, CategoricalPartial] = {}
        n_rows: int | None = None
        for name, spec in self.columns.items():
            count, missing = (max(0, round(v)) for v in values[f"{name}.count"][:2])
            n_rows = count + missing if n_rows is None else n_rows
            if "value_counts" in spec.kinds:
                noisy = values[f"{name}.value_counts"]
                levels = [*spec.categories, mech.OTHER]
                categorical[name] = CategoricalPartial(
                    count=count, missing=missing,
                    value_counts={level: max(0, round(v)) for level, v in zip(levels, noisy, strict=True)})
            elif not spec.numeric:
                categorical[name] = CategoricalPartial(count=count, missing=missing, value_counts={})
            if spec.numeric and (set(spec.kinds) - {"count", "value_counts"} or "value_counts" not in spec.kinds):
                numeric[name] = spec.numeric_partial(values, count, missing)
        crosstab = None
        if self.crosstab_pair is not None:
            rows, cols, row_levels, col_levels = self.crosstab_pair
            cell_values = iter(values["crosstab"])
            cells: dict[str, dict[str, int | None]] = {}
            for r in row_levels:
                for c in col_levels:
                    cells.setdefault(r, {})[c] = max(0, round(next(cell_values)))
            crosstab = CrosstabPartial(rows=rows, cols=cols, cells=cells)
            if n_rows is None:
                n_rows = sum(v or 0 for row in cells.values() for v in row.values())
        return FAReply(dataset_id=dataset_id, n_rows=n_rows or 0, numeric=numeric, categorical=categorical,
                       crosstab=crosstab, refused=self.refused)


class _Column:
    """The queries made of one column and what they need to become a partial."""

    def __init__(self, name: str, numeric: bool) -> None:
        self.name, self.numeric = name, numeric
        self.kinds: list[str] = []
        self.center = self.radius = 0.0
        self.grid: np.ndarray | None = None
        self.edges: np.ndarray | None = None
        self.categories: list[str] = []

    def numeric_partial(self, values: Mapping[str, Sequence[float]], count: int, missing: int) -> NumericPartial:
        """Moments from the noisy sums (n at least 1 where it divides), the histogram and the quantile grid
        as counts (negative noisy counts read as 0). Figures not asked are NaN: nothing was spent on them."""
        n = max(count, 1)
        total = mean = m2 = math.nan
        if "sum" in self.kinds:
            s1 = float(values[f"{self.name}.sum"][0])
            mean = min(max(self.center + s1 / n, self.center - self.radius), self.center + self.radius)
            total = mean * count
            if "sumsq" in self.kinds:
                s2 = float(values[f"{self.name}.sumsq"][0])
                m2 = max(0.0, s2 - s1 * s1 / n)
        histogram_edges: list[float] | None = None
        histogram: list[int | None] | None = None
        if self.edges is not None:
            counts = values[f"{self.name}.histogram"][: self.edges.size - 1]  # the last entry: outside every bin
            histogram_edges = [float(e) for e in self.edges]
            histogram = [max(0, round(v)) for v in counts]
        below: list[int | None] | None = None
        below_at: list[float] | None = None
        resolution = None
        if self.grid is not None:
            counts = values[f"{self.name}.quantiles"][: self.grid.size - 1]
            cumulative = np.cumsum([max(0, round(v)) for v in counts])
            below = [0, *(int(c) for c in cumulative)]
            below_at = [float(g) for g in self.grid]
            resolution = float(self.grid[1] - self.grid[0])
        return NumericPartial(count=count, missing=missing, sum=total, mean=mean, m2=m2,
                              histogram_edges=histogram_edges, histogram=histogram, below=below,
                              resolution=resolution, below_at=below_at)


def _floats(series: pd.Series) -> np.ndarray:
    return np.asarray(series.to_numpy(dtype=np.float64), dtype=np.float64)


def _as_str(series: pd.Series) -> list[str]:
    return [str(v) for v in series.tolist()]
