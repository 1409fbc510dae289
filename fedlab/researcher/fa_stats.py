"""Researcher.stats: one call, as many FARequestJob rounds as the statistics need.

Round 1 asks every node for the partials of what was asked (moments always come along).
A histogram given as a bin count needs the federated range first, so its edges are made
from the merged (noisy, outward) min and max and sent in round 2. Quantiles and the median
are found by bisection over counts: each further round sends thresholds and gets back only
how many values lie at or below each (see ``fedlab.analytics.quantiles``). Nodes that
refused or failed round 1 are not asked again; everything they said is kept in the result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from fedlab.analytics.merge import merge_categorical, merge_covariance, merge_crosstab, merge_numeric
from fedlab.analytics.messages import STATISTICS, FAReply
from fedlab.analytics.quantiles import QuantileSearch
from fedlab.errors import FedlabError
from fedlab.researcher.fa_result import FAResult, contributors
from fedlab.researcher.federated_dataset import FederatedDataset
from fedlab.researcher.jobs import FARequestJob
from fedlab.researcher.policies import DiscardOnTimeout
from fedlab.researcher.requests import Requests

__all__ = ["federated_stats"]

DEFAULT_QUANTILES = (0.25, 0.5, 0.75)
_NUMERIC_ONLY = {"sum", "mean", "var", "std", "min", "max", "median", "quantiles", "histogram"}
_TABLE = {"crosstab", "cov", "corr"}
_ROUND_ONLY = {"median", "quantiles"}


def _is_numeric_dtype(dtype: str) -> bool:
    return dtype.startswith(("int", "uint", "float", "bool", "Int", "UInt", "Float"))


def _plan(fds: FederatedDataset, stats: Sequence[str], columns: Sequence[str] | None,
          stats_args: Mapping[str, Mapping[str, Any]] | None, bins: int | Sequence[float] | None,
          ) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, int]]:
    """Per-column statistics and arguments for round 1, and the bin counts to resolve later."""
    reference = fds.dataset(fds.node_ids()[0])
    dtypes = dict(reference.dtypes)
    selected = list(columns) if columns else list(reference.columns) if stats else []
    selected += [c for c in (stats_args or {}) if c not in selected]
    unknown = [c for c in selected if c not in dtypes]
    if unknown:
        raise FedlabError(f"columns {unknown} are not in the dataset; it has {list(reference.columns)}")
    per_column: dict[str, dict[str, dict[str, Any]]] = {}
    bin_counts: dict[str, int] = {}
    for column in selected:
        numeric = _is_numeric_dtype(dtypes[column])
        wanted: dict[str, dict[str, Any]] = {s: {} for s in stats if s not in _TABLE}
        for stat, args in (stats_args or {}).get(column, {}).items():
            wanted[stat] = dict(args)
        if not numeric:
            wanted = {s: a for s, a in wanted.items() if s not in _NUMERIC_ONLY}
        wanted = {s: a for s, a in wanted.items() if s not in _ROUND_ONLY}
        if "histogram" in wanted:
            spec = wanted["histogram"].get("edges", wanted["histogram"].get("bins", bins if bins is not None else 10))
            if isinstance(spec, int):
                bin_counts[column] = spec
                del wanted["histogram"]
                wanted.update({"min": {}, "max": {}})
            else:
                wanted["histogram"] = {"edges": [float(e) for e in spec]}
        wanted.setdefault("count", {})
        per_column[column] = wanted
    return per_column, bin_counts


def federated_stats(
    fds: FederatedDataset,
    *,
    researcher_id: str,
    requests: Requests,
    stats: Sequence[str],
    columns: Sequence[str] | None = None,
    stats_args: Mapping[str, Mapping[str, Any]] | None = None,
    bins: int | Sequence[float] | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    crosstab: Sequence[str] = (),
    node_names: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> FAResult:
    names = list(stats) + [s for per in (stats_args or {}).values() for s in per]
    unknown = sorted(set(names) - set(STATISTICS))
    if unknown:
        raise FedlabError(f"unknown statistics {unknown}; choose from {list(STATISTICS)}")
    if crosstab and "crosstab" not in names:
        names.append("crosstab")
    if "crosstab" in names and len(crosstab) != 2:
        raise FedlabError("a crosstab needs two columns: crosstab=['row column', 'column column']")
    table = [s for s in dict.fromkeys(names) if s in _TABLE]
    levels = sorted({*map(float, quantiles), *([0.5] if "median" in names else [])})
    if any(not 0 <= q <= 1 for q in levels):
        raise FedlabError(f"quantile levels must lie in [0, 1], got {levels}")
    per_column, bin_counts = _plan(fds, list(stats) + table, columns, stats_args, bins)
    policies = [DiscardOnTimeout(timeout)]

    def run(args: dict[str, dict[str, dict[str, Any]]], nodes: Sequence[str],
            thresholds: Mapping[str, Sequence[float]] | None = None, *, first: bool = False,
            ) -> tuple[FARequestJob, dict[str, FAReply]]:
        job = FARequestJob(None, None, fds, args, None, researcher_id=researcher_id, requests=requests,
                           nodes=nodes, policies=policies, crosstab=crosstab if first and table else (),
                           thresholds=thresholds, raise_on_error=False, table_stats=table if first else ())
        return job, job.execute()

    first, replies = run(per_column, fds.node_ids(), first=True)
    result = FAResult(stats=list(dict.fromkeys(names)), quantile_levels=levels,
                      node_names=dict(node_names or {}), replies=dict(replies))
    for node_id, error in first.errors.items():
        target = result.refused if error.code == "disclosure_refused" else result.failed
        target[node_id] = f"[{error.code}] {error.message}"
    result.missing = {n: str(m) for n, m in first.missing.items()}
    answering = list(replies)

    if bin_counts and answering:
        _resolve_bins(result, bin_counts, run, answering)
    wants_quantiles = bool({"median", "quantiles"} & set(names))
    _merge(result, per_column)
    if wants_quantiles and answering:
        _quantile_rounds(result, run, answering)
    return result


def _merge(result: FAResult, per_column: Mapping[str, Any]) -> None:
    replies = result.replies
    for column in per_column:
        numeric = {n: r.numeric[column] for n, r in replies.items() if column in r.numeric}
        if numeric:
            result.numeric[column] = merge_numeric(numeric)
        categorical = {n: r.categorical[column] for n, r in replies.items() if column in r.categorical}
        if categorical:
            result.categorical[column] = merge_categorical(categorical)
        result.contributors[column] = contributors(replies, column)
    crosstabs = {n: r.crosstab for n, r in replies.items() if r.crosstab is not None}
    if crosstabs:
        merged = merge_crosstab(crosstabs)
        result.crosstab_table, result.crosstab_suppressed = merged.table, dict(merged.suppressed)
    covariances = {n: r.covariance for n, r in replies.items() if r.covariance is not None}
    if covariances:
        result.covariance, result.correlation = merge_covariance(covariances)


def _resolve_bins(result: FAResult, bin_counts: Mapping[str, int], run: Any, nodes: Sequence[str]) -> None:
    """Turn bin counts into edges over the federated (noisy, outward) range, then ask for them."""
    edges: dict[str, dict[str, dict[str, Any]]] = {}
    for column, count in bin_counts.items():
        partials = {n: r.numeric[column] for n, r in result.replies.items() if column in r.numeric}
        lows = [p.min for p in partials.values()]
        highs = [p.max for p in partials.values()]
        if not partials or any(v is None for v in lows + highs):
            withheld = [result.node_names.get(n, n) for n, p in partials.items() if p.min is None]
            raise FedlabError(
                f"a histogram of {column!r} with {count} bins needs the federated range, but nodes "
                f"{withheld} do not release min/max (their disclosure.min_max rule); give explicit edges "
                f"instead, e.g. stats_args={{{column!r}: {{'histogram': {{'edges': [...]}}}}}}")
        lo, hi = min(v for v in lows if v is not None), max(v for v in highs if v is not None)
        edges[column] = {"histogram": {"edges": np.linspace(lo, hi, count + 1).tolist()}}
    _, second = run(edges, nodes)
    for node_id, reply in second.items():
        merged_numeric = dict(result.replies[node_id].numeric)
        refused = dict(result.replies[node_id].refused)
        for column in bin_counts:
            if column in reply.numeric and column in merged_numeric:
                merged_numeric[column] = msgspec.structs.replace(
                    merged_numeric[column], histogram_edges=reply.numeric[column].histogram_edges,
                    histogram=reply.numeric[column].histogram)
            refused.update({k: v for k, v in reply.refused.items() if k.startswith(column)})
        result.replies[node_id] = msgspec.structs.replace(result.replies[node_id], numeric=merged_numeric,
                                                          refused=refused)


def _quantile_rounds(result: FAResult, run: Any, nodes: Sequence[str], max_rounds: int = 60) -> None:
    searches: dict[str, QuantileSearch] = {}
    for column, merged in result.numeric.items():
        if merged.count == 0:
            continue
        searches[column] = QuantileSearch.from_moments(result.quantile_levels, merged.count, merged.mean,
                                                       merged.std)
    contributing = {c: set(result.contributors.get(c, [])) for c in searches}
    for _ in range(max_rounds):
        thresholds = {c: t for c, s in list(searches.items()) if (t := s.next_thresholds())}
        if not thresholds:
            break
        _, replies = run({c: {"quantiles": {}} for c in thresholds}, nodes, thresholds)
        for column, ts in thresholds.items():
            counts = np.zeros(len(ts), dtype=np.int64)
            for node_id in contributing[column]:
                partial = replies[node_id].numeric.get(column) if node_id in replies else None
                if partial is None or partial.below is None:  # counts would no longer add up
                    result.failed.setdefault(node_id, f"did not answer a quantile round for {column!r}")
                    del searches[column]
                    break
                counts += np.asarray(partial.below, dtype=np.int64)
            else:
                searches[column].update(counts.tolist())
    for column, search in searches.items():
        result.quantiles[column] = {q: float(v) for q, v in search.result().items()}
    for column in result.numeric:
        result.quantiles.setdefault(column, {q: math.nan for q in result.quantile_levels})
