"""Researcher.stats(..., epsilon=...): differentially private statistics, in one round.

Every node answers noisy partials and spends ``epsilon`` (and ``delta``) of this researcher's budget on
its dataset's source (see :mod:`fedlab.node.dp_analytics`); the figures merge as exact ones do (each
node's noise adds up, so the pooled error shrinks relative to the pooled counts). Quantiles come from
each node's noisy counts on a grid over the clamp bounds: the researcher sums the nodes' cumulative
counts (interpolated linearly inside each bin, on the union of the nodes' grids) and reads each level
off the sum. A histogram asked as a bin count is drawn over the column's bounds (there is no DP range
to draw it over otherwise). There is only one round, so a DP request costs what it says, once.

The result carries, per node, what it spent, what remains and the noise scale of every figure:
``result.privacy()`` and ``result.noise()``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from fedlab.analytics.merge import merge_categorical, merge_crosstab, merge_numeric
from fedlab.analytics.messages import FAReply, NumericPartial
from fedlab.errors import FedlabError
from fedlab.protocol.dp_messages import DPQuery
from fedlab.researcher.fa_result import FAResult, contributors
from fedlab.researcher.fa_stats import DEFAULT_QUANTILES, asked_statistics
from fedlab.researcher.federated_dataset import FederatedDataset
from fedlab.researcher.jobs import FARequestJob
from fedlab.researcher.policies import DiscardOnTimeout
from fedlab.researcher.requests import Requests

__all__ = ["dp_query", "dp_stats"]

_TABLE = {"crosstab", "cov", "corr"}


def dp_query(epsilon: float, *, delta: float = 0.0, mechanism: str = "laplace",
             bounds: Mapping[str, Sequence[float]] | None = None,
             categories: Mapping[str, Sequence[Any]] | None = None, quantile_bins: int = 32) -> DPQuery:
    """The wire form of a DP request, checked here for a clear error (the node checks it again)."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not (0 < epsilon <= 1000):
        raise FedlabError(f"epsilon must be a number in (0, 1000], got {epsilon!r}: e.g. epsilon=1.0")
    if mechanism not in ("laplace", "gaussian"):
        raise FedlabError(f"mechanism must be 'laplace' or 'gaussian', got {mechanism!r}")
    if mechanism == "gaussian" and not 0 < delta < 1:
        raise FedlabError(f"the Gaussian mechanism needs a delta in (0, 1), e.g. delta=1e-7; got {delta!r}")
    if mechanism == "laplace" and delta:
        raise FedlabError("the Laplace mechanism spends no delta: leave delta=0, or use mechanism='gaussian'")
    checked: dict[str, list[float]] = {}
    for column, pair in (bounds or {}).items():
        try:
            lo, hi = (float(v) for v in pair)
        except (TypeError, ValueError):
            raise FedlabError(f"bounds of {column!r} must be (lo, hi), got {pair!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise FedlabError(f"bounds of {column!r} must be finite with lo < hi, got {pair!r}")
        checked[column] = [lo, hi]
    levels = {c: [str(v) for v in values] for c, values in (categories or {}).items()}
    if not 2 <= int(quantile_bins) <= 4096:
        raise FedlabError(f"quantile_bins must be 2 to 4096, got {quantile_bins!r}")
    return DPQuery(epsilon=float(epsilon), delta=float(delta), mechanism=mechanism, bounds=checked,
                   categories=levels, quantile_bins=int(quantile_bins))


def _per_column(fds: FederatedDataset, stats: Sequence[str], columns: Sequence[str] | None,
                stats_args: Mapping[str, Mapping[str, Any]] | None, bins: int | Sequence[float] | None,
                query: DPQuery) -> dict[str, dict[str, dict[str, Any]]]:
    reference = fds.dataset(fds.node_ids()[0])
    selected = list(columns) if columns else list(reference.columns) if stats else []
    selected += [c for c in (stats_args or {}) if c not in selected]
    unknown = [c for c in selected if c not in reference.columns]
    if unknown:
        raise FedlabError(f"columns {unknown} are not in the dataset; it has {list(reference.columns)}")
    per_column: dict[str, dict[str, dict[str, Any]]] = {}
    for column in selected:
        wanted: dict[str, dict[str, Any]] = {s: {} for s in stats if s not in _TABLE}
        for stat, args in (stats_args or {}).get(column, {}).items():
            wanted[stat] = dict(args)
        if "histogram" in wanted:
            spec = wanted["histogram"].get("edges", wanted["histogram"].get("bins", bins if bins is not None else 10))
            if isinstance(spec, int):
                if column not in query.bounds:
                    raise FedlabError(
                        f"a DP histogram of {column!r} with {spec} bins needs its bounds (bounds={{{column!r}: "
                        "(lo, hi)}) or explicit edges (stats_args={'col': {'histogram': {'edges': [...]}}})")
                lo, hi = query.bounds[column]
                wanted["histogram"] = {"edges": np.linspace(lo, hi, spec + 1).tolist()}
            else:
                wanted["histogram"] = {"edges": [float(e) for e in spec]}
        wanted.setdefault("count", {})
        per_column[column] = wanted
    return per_column


def dp_stats(
    fds: FederatedDataset,
    *,
    researcher_id: str,
    requests: Requests,
    stats: Sequence[str],
    query: DPQuery,
    columns: Sequence[str] | None = None,
    stats_args: Mapping[str, Mapping[str, Any]] | None = None,
    bins: int | Sequence[float] | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    crosstab: Sequence[str] = (),
    node_names: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> FAResult:
    names, table = asked_statistics(stats, stats_args, crosstab)
    levels = sorted({*map(float, quantiles), *([0.5] if "median" in names else [])})
    if any(not 0 <= q <= 1 for q in levels):
        raise FedlabError(f"quantile levels must lie in [0, 1], got {levels}")
    per_column = _per_column(fds, list(stats), columns, stats_args, bins, query)
    job = FARequestJob(None, None, fds, per_column, None, researcher_id=researcher_id, requests=requests,
                       policies=[DiscardOnTimeout(timeout)], crosstab=crosstab if "crosstab" in table else (),
                       raise_on_error=False, table_stats=table, dp=query)
    replies = job.execute()
    result = FAResult(stats=list(dict.fromkeys(names)), quantile_levels=levels, node_names=dict(node_names or {}),
                      replies=dict(replies))
    for node_id, error in job.errors.items():
        refusal = error.code in ("disclosure_refused", "budget_exhausted")
        (result.refused if refusal else result.failed)[node_id] = f"[{error.code}] {error.message}"
    result.missing = {n: str(m) for n, m in job.missing.items()}
    result.dp = {n: r.dp for n, r in replies.items() if r.dp is not None}
    _merge(result, per_column, replies, wants_quantiles=bool({"median", "quantiles"} & set(names)))
    return result


def _merge(result: FAResult, per_column: Mapping[str, Any], replies: Mapping[str, FAReply], *,
           wants_quantiles: bool) -> None:
    for column in per_column:
        numeric = {n: msgspec.structs.replace(r.numeric[column], below=None, below_at=None)
                   for n, r in replies.items() if column in r.numeric}
        if numeric:
            result.numeric[column] = merge_numeric(numeric)
        categorical = {n: r.categorical[column] for n, r in replies.items() if column in r.categorical}
        if categorical:
            result.categorical[column] = merge_categorical(categorical)
        result.contributors[column] = contributors(replies, column)
        if wants_quantiles and column in result.numeric:
            grids = {n: r.numeric[column] for n, r in replies.items()
                     if column in r.numeric and r.numeric[column].below is not None}
            result.quantiles[column] = pooled_quantiles(grids, result.quantile_levels)
            result.quantile_nodes[column] = list(grids)
            # noisy, not bracketed: no half-width can be given (the noise scales are in result.noise())
            result.quantile_errors[column] = {q: math.nan for q in result.quantile_levels}
            resolutions = [p.resolution for p in grids.values() if p.resolution]
            if resolutions:
                result.resolutions[column] = max(resolutions)
    crosstabs = {n: r.crosstab for n, r in replies.items() if r.crosstab is not None}
    if crosstabs:
        merged = merge_crosstab(crosstabs)
        result.crosstab_table, result.crosstab_suppressed = merged.table, dict(merged.suppressed)


def pooled_quantiles(grids: Mapping[str, NumericPartial], levels: Sequence[float]) -> dict[float, float]:
    """Quantiles of the pooled values from each node's cumulative noisy counts at its grid points
    (``below[i]`` values at or below ``below_at[i]``), linear within each bin; NaN without counts."""
    if not grids:
        return {q: math.nan for q in levels}
    points = np.unique(np.concatenate([np.asarray(p.below_at, dtype=np.float64) for p in grids.values()]))
    cdf = np.zeros_like(points)
    for p in grids.values():
        at = np.asarray(p.below_at, dtype=np.float64)
        below = np.maximum.accumulate(np.asarray([b or 0 for b in (p.below or [])], dtype=np.float64))
        cdf += np.interp(points, at, below, left=0.0, right=float(below[-1]) if below.size else 0.0)
    total = float(cdf[-1])
    if total <= 0:
        return {q: math.nan for q in levels}
    out: dict[float, float] = {}
    for q in levels:
        target = q * total
        i = int(np.searchsorted(cdf, target, side="left"))
        if i == 0:
            out[q] = float(points[0])
        elif i >= points.size:
            out[q] = float(points[-1])
        else:
            lo_c, hi_c = cdf[i - 1], cdf[i]
            frac = 0.0 if hi_c <= lo_c else (target - lo_c) / (hi_c - lo_c)
            out[q] = float(points[i - 1] + frac * (points[i] - points[i - 1]))
    return out
