"""Researcher.stats: one call, as many FARequestJob rounds as the statistics need.

Round 1 asks every node for the partials of what was asked (moments always come along).
A histogram given as a bin count needs the federated range first, so its edges are made
from the merged (noisy, outward) min and max, rounded outward to a power-of-ten grid (the
nodes round edges to theirs: edges on a coarser power of ten stay where they are), and sent
in round 2. Quantiles and the median are found by a search over counts: each further round
sends thresholds and gets back only how many values lie at or below each (see
``fedlab.analytics.quantiles``). Every such round, and round 1, also sends the quantile levels
asked for (``stats_args[column]["quantiles"] = {"levels": [...]}``), which a node may refuse for a
column with too few values; round 1 carries one threshold far below any value (it reveals no
value) to learn each node's threshold grid and any such refusal before the search starts. A
node may withhold single counts: the search bounds each by the node's own counts around it
(they grow with the threshold) and reports a quantile it could not pin down as approximate,
with its bound. Nodes that refused or failed round 1 are not asked again;
everything they said is kept in the result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from fedlab.analytics.merge import merge_categorical, merge_covariance, merge_crosstab, merge_numeric
from fedlab.analytics.messages import STATISTICS, FAReply, NumericPartial
from fedlab.analytics.quantiles import NodeAnswer, QuantileSearch
from fedlab.errors import FedlabError
from fedlab.researcher.fa_result import FAResult, contributors
from fedlab.researcher.federated_dataset import FederatedDataset
from fedlab.researcher.jobs import FARequestJob
from fedlab.researcher.policies import DiscardOnTimeout
from fedlab.researcher.requests import Requests

__all__ = ["federated_stats", "nice_edges"]

DEFAULT_QUANTILES = (0.25, 0.5, 0.75)
# round 1's quantile threshold: below every value, so a node answers 0 without it being a cut
_PROBE = -1.7976931348623157e308
_NUMERIC_ONLY = {"sum", "mean", "var", "std", "min", "max", "median", "quantiles", "histogram"}
_TABLE = {"crosstab", "cov", "corr"}
_ROUND_ONLY = {"median", "quantiles"}


def _is_numeric_dtype(dtype: str) -> bool:
    return dtype.startswith(("int", "uint", "float", "bool", "Int", "UInt", "Float"))


def _plan(fds: FederatedDataset, stats: Sequence[str], columns: Sequence[str] | None,
          stats_args: Mapping[str, Mapping[str, Any]] | None, bins: int | Sequence[float] | None,
          levels: Sequence[float] | None = None,
          ) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, int]]:
    """Per-column statistics and arguments for round 1, and the bin counts to resolve later.
    With ``levels`` (quantiles wanted), numeric columns also carry them under "quantiles"."""
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
        if levels is not None and numeric:
            wanted["quantiles"] = {"levels": list(levels)}
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


def asked_statistics(stats: Sequence[str], stats_args: Mapping[str, Mapping[str, Any]] | None,
                     crosstab: Sequence[str]) -> tuple[list[str], list[str]]:
    """Every statistic asked (``stats`` and those of ``stats_args``, plus "crosstab" when its columns are
    given), checked, and the table statistics among them."""
    names = list(stats) + [s for per in (stats_args or {}).values() for s in per]
    unknown = sorted(set(names) - set(STATISTICS))
    if unknown:
        raise FedlabError(f"unknown statistics {unknown}; choose from {list(STATISTICS)}")
    if crosstab and "crosstab" not in names:
        names.append("crosstab")
    if "crosstab" in names and len(crosstab) != 2:
        raise FedlabError("a crosstab needs two columns: crosstab=['row column', 'column column']")
    return names, [s for s in dict.fromkeys(names) if s in _TABLE]


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
    names, table = asked_statistics(stats, stats_args, crosstab)
    levels = sorted({*map(float, quantiles), *([0.5] if "median" in names else [])})
    if any(not 0 <= q <= 1 for q in levels):
        raise FedlabError(f"quantile levels must lie in [0, 1], got {levels}")
    wants_quantiles = bool({"median", "quantiles"} & set(names))
    per_column, bin_counts = _plan(fds, list(stats) + table, columns, stats_args, bins,
                                   levels if wants_quantiles else None)
    probe = {c: [_PROBE] for c, wanted in per_column.items() if "quantiles" in wanted}
    policies = [DiscardOnTimeout(timeout)]

    def run(args: dict[str, dict[str, dict[str, Any]]], nodes: Sequence[str],
            thresholds: Mapping[str, Sequence[float]] | None = None, *, first: bool = False,
            ) -> tuple[FARequestJob, dict[str, FAReply]]:
        job = FARequestJob(None, None, fds, args, None, researcher_id=researcher_id, requests=requests,
                           nodes=nodes, policies=policies, crosstab=crosstab if first and table else (),
                           thresholds=thresholds, raise_on_error=False, table_stats=table if first else ())
        return job, job.execute()

    first, replies = run(per_column, fds.node_ids(), probe or None, first=True)
    result = FAResult(stats=list(dict.fromkeys(names)), quantile_levels=levels,
                      node_names=dict(node_names or {}), replies=_without_probe(replies, probe, per_column))
    _note_allowances(result, replies)
    for node_id, error in first.errors.items():
        target = result.refused if error.code in ("disclosure_refused", "secagg_refused") else result.failed
        target[node_id] = f"[{error.code}] {error.message}"
    result.missing = {n: str(m) for n, m in first.missing.items()}
    answering = list(replies)

    if bin_counts and answering:
        _resolve_bins(result, bin_counts, run, answering)
    _merge(result, per_column)
    if wants_quantiles and answering:
        _quantile_rounds(result, run, answering, {n: r.numeric for n, r in replies.items()})
    return result


def _without_probe(replies: Mapping[str, FAReply], probe: Mapping[str, Any],
                   per_column: Mapping[str, Mapping[str, Any]]) -> dict[str, FAReply]:
    """Round 1's replies without the probe's counts (they are no statistic of the column), nor a
    node's note that it withheld the probe (the researcher asked no threshold of its own)."""
    out = {}
    for node_id, reply in replies.items():
        numeric = {c: msgspec.structs.replace(p, below=None) if c in probe and p.below is not None else p
                   for c, p in reply.numeric.items()}
        refused = {k: v for k, v in reply.refused.items()
                   if not (k.endswith(".thresholds") and k[: -len(".thresholds")] in probe
                           and "histogram" not in per_column.get(k[: -len(".thresholds")], {}))}
        out[node_id] = msgspec.structs.replace(reply, numeric=numeric, refused=refused)
    return out


def _about(key: str, column: str) -> bool:
    """Whether a refusal key ("column" or "column.stat") is about ``column``."""
    return key == column or key.startswith(column + ".")


def _note_allowances(result: FAResult, replies: Mapping[str, FAReply]) -> None:
    for node_id, reply in replies.items():
        if reply.allowance:
            result.allowances.setdefault(node_id, {}).update(reply.allowance)


def _note_refusals(result: FAResult, replies: Mapping[str, FAReply], columns: Sequence[str]) -> None:
    """Keep what later rounds withheld on ``columns`` with the node's round-1 refusals (for notes())."""
    for node_id, reply in replies.items():
        extra = {k: v for k, v in reply.refused.items() if any(_about(k, c) for c in columns)}
        if extra and node_id in result.replies:
            refused = {**result.replies[node_id].refused, **extra}
            result.replies[node_id] = msgspec.structs.replace(result.replies[node_id], refused=refused)


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


def nice_edges(lo: float, hi: float, bins: int) -> list[float]:
    """``bins + 1`` edges from ``lo`` to ``hi`` rounded outward to a "nice" grid: a power of ten at
    or below a tenth of the bin width (the lowest edge floored, the highest ceiled, the others
    rounded to the nearest grid point), so that they also lie on the nodes' power-of-ten threshold
    grids (as long as those are no coarser) and a node's rounding leaves them where they are."""
    if bins < 1:
        raise FedlabError(f"a histogram needs at least 1 bin, got {bins}")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise FedlabError(f"the federated range [{lo}, {hi}] is not finite: give explicit bin edges")
    if not hi > lo:  # one value (or a constant column): one unit around it
        lo, hi = lo - 0.5, hi + 0.5
    raw = np.linspace(lo, hi, bins + 1).tolist()
    width = (hi - lo) / bins
    if not (width > 0 and math.isfinite(width)):
        return raw
    exponent = math.floor(math.log10(width / 10))

    def point(m: int) -> float:
        return float(m * 10**exponent) if exponent >= 0 else m / 10 ** (-exponent)

    step = 10.0**exponent
    if not max(abs(lo), abs(hi)) / step < 2.0**52:  # too fine a grid for floats: keep the raw edges
        return raw
    first = math.floor(lo / step)
    while point(first) > lo:
        first -= 1
    last = math.ceil(hi / step)
    while point(last) < hi:
        last += 1
    ms = [first, *(round(e / step) for e in raw[1:-1]), last]
    for i in range(1, len(ms)):  # strictly increasing, whatever rounding did
        ms[i] = max(ms[i], ms[i - 1] + 1)
    return [point(m) for m in ms]


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
                f"{withheld} do not release min/max (their disclosure.min_max rule); give explicit bin "
                f"edges instead: `%fed hist {column} --edges 0 10 20 30 ...` in a notebook, or "
                f"stats_args={{{column!r}: {{'histogram': {{'edges': [0, 10, 20, 30]}}}}}} from Python")
        lo, hi = min(v for v in lows if v is not None), max(v for v in highs if v is not None)
        edges[column] = {"histogram": {"edges": nice_edges(lo, hi, count)}}
    _, second = run(edges, nodes)
    _note_allowances(result, second)
    for node_id, reply in second.items():
        merged_numeric = dict(result.replies[node_id].numeric)
        refused = dict(result.replies[node_id].refused)
        for column in bin_counts:
            if column in reply.numeric and column in merged_numeric:
                merged_numeric[column] = msgspec.structs.replace(
                    merged_numeric[column], histogram_edges=reply.numeric[column].histogram_edges,
                    histogram=reply.numeric[column].histogram,
                    resolution=reply.numeric[column].resolution or merged_numeric[column].resolution)
            refused.update({k: v for k, v in reply.refused.items() if _about(k, column)})
        result.replies[node_id] = msgspec.structs.replace(result.replies[node_id], numeric=merged_numeric,
                                                          refused=refused)


def _quantile_rounds(result: FAResult, run: Any, nodes: Sequence[str],
                     first: Mapping[str, Mapping[str, NumericPartial]], max_rounds: int = 60) -> None:
    """Search every numeric column's quantiles over the nodes that hold values and did not refuse
    them; ``first`` is round 1's numeric partials (with the probe: each node's grid step)."""
    levels = list(result.quantile_levels)
    members: dict[str, list[str]] = {}
    searches: dict[str, QuantileSearch] = {}
    for column, merged in result.numeric.items():
        if merged.count == 0:
            continue
        holders = [n for n in result.contributors.get(column, []) if column in result.replies[n].numeric]
        members[column] = []
        for node_id in holders:
            why = result.replies[node_id].refused.get(f"{column}.quantiles")
            if why is not None:
                result.quantile_refused.setdefault(column, {})[node_id] = why
            else:
                members[column].append(node_id)
        steps = [p.resolution for n in members[column] if (p := first.get(n, {}).get(column)) is not None]
        search = _new_search(result, column, members[column], steps, max_rounds)
        if search is not None:
            searches[column] = search
    # each search stops by itself after max_rounds; a restart (a node refusing) starts one afresh
    for _ in range(max_rounds * (len(nodes) + 1)):
        thresholds = {c: t for c, s in list(searches.items()) if (t := s.next_thresholds())}
        if not thresholds:
            break
        asked = sorted({n for c in thresholds for n in members[c]}, key=list(nodes).index)
        _, replies = run({c: {"quantiles": {"levels": levels}} for c in thresholds}, asked, thresholds)
        _note_allowances(result, replies)
        _note_refusals(result, replies, list(thresholds))
        for column, ts in thresholds.items():
            # each node's own counts (None where withheld), its grid and its number of values (round
            # 1's): the search bounds a withheld count by the node's answers around it
            answers: dict[str, NodeAnswer] = {}
            refused: dict[str, str] = {}
            lost = None
            for node_id in members[column]:
                reply = replies.get(node_id)
                partial = reply.numeric.get(column) if reply is not None else None
                why = (reply.refused.get(f"{column}.quantiles") or reply.refused.get(column)) if reply else None
                if why is not None and (partial is None or partial.below is None):
                    refused[node_id] = why
                elif partial is None or partial.below is None or len(partial.below) != len(ts):
                    lost = node_id  # counts would no longer add up
                    break
                else:
                    answers[node_id] = NodeAnswer(partial.below, partial.resolution,
                                                  result.replies[node_id].numeric[column].count, partial.below_at)
            if lost is not None:
                result.failed.setdefault(lost, f"did not answer a quantile round for {column!r}")
                del searches[column]
            elif refused:  # the others' counts are not of the same values: start again without them
                result.quantile_refused.setdefault(column, {}).update(refused)
                members[column] = [n for n in members[column] if n not in refused]
                steps = [a.resolution for a in answers.values()]
                restarted = _new_search(result, column, members[column], steps, max_rounds)
                if restarted is None:
                    del searches[column]
                else:
                    searches[column] = restarted
            else:
                searches[column].update_nodes(answers)
                searches[column].set_resolution(_largest([a.resolution for a in answers.values()]))
    for column, search in searches.items():
        if not search.finished:  # cannot happen (every search stops by itself): say so, do not guess
            result.quantile_approximate[column] = list(result.quantile_levels)
            continue
        bounded = search.result_with_bounds()
        result.quantiles[column] = {q: float(v) for q, (v, _) in bounded.items()}
        result.quantile_errors[column] = {q: float(h) for q, (_, h) in bounded.items()}
        result.quantile_approximate[column] = search.approximate
        if search.resolution is not None:
            result.resolutions[column] = search.resolution
    for column, used in members.items():
        result.quantile_nodes[column] = list(used)
    for column in result.numeric:
        result.quantiles.setdefault(column, {q: math.nan for q in result.quantile_levels})
        result.quantile_errors.setdefault(column, {q: math.inf for q in result.quantile_levels})


def _largest(steps: Sequence[float | None]) -> float | None:
    known = [float(r) for r in steps if r]
    return max(known) if known else None


def _new_search(result: FAResult, column: str, nodes: Sequence[str], steps: Sequence[float | None],
                max_rounds: int) -> QuantileSearch | None:
    """A quantile search over the values of ``nodes`` only (None if they hold none)."""
    partials = {n: result.replies[n].numeric[column] for n in nodes if column in result.replies[n].numeric}
    if not partials:
        return None
    merged = merge_numeric({n: msgspec.structs.replace(p, below=None) for n, p in partials.items()})
    if merged.count == 0:
        return None
    return QuantileSearch.from_moments(result.quantile_levels, merged.count, merged.mean, merged.std,
                                       resolution=_largest(steps), max_rounds=max_rounds)
