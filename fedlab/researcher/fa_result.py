"""FAResult: what a federated statistics call gives back, as pandas objects.

It holds the merged (global) statistics, each node's own figures, and an honest account of
who took part: which nodes answered, which refused (and by which rule), which failed, which
did not answer, and which columns a node withheld. Nothing is silently partial: the
``nodes`` column of ``global_stats()`` says how many nodes each figure is built from.

Quantiles come with error bounds (``quantile_bounds()``): nodes round thresholds to a grid and
withhold some counts, so a quantile is exact to within the grid where every node answers and
approximate, within a stated half-width, otherwise; ``notes()`` names every approximate one.
``allowance()`` shows how many more thresholds and edges each node will still answer per column,
``withheld_levels()`` how many value-count levels each node withheld without naming them.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from fedlab.analytics.merge import MergedCategorical, MergedNumeric
from fedlab.analytics.messages import FAReply
from fedlab.protocol.dp_messages import DPSpent

__all__ = ["FAResult"]

SCALAR_ORDER = ("count", "missing", "sum", "mean", "var", "std", "min", "max", "median")


@dataclass
class FAResult:
    stats: list[str]
    quantile_levels: list[float]
    node_names: dict[str, str]
    replies: dict[str, FAReply]
    numeric: dict[str, MergedNumeric] = field(default_factory=dict)
    categorical: dict[str, MergedCategorical] = field(default_factory=dict)
    quantiles: dict[str, dict[float, float]] = field(default_factory=dict)
    crosstab_table: pd.DataFrame | None = None
    crosstab_suppressed: dict[Any, list[str]] = field(default_factory=dict)
    covariance: pd.DataFrame | None = None
    correlation: pd.DataFrame | None = None
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    contributors: dict[str, list[str]] = field(default_factory=dict)
    # column -> {q: half-width}: the pooled quantile lies within it of quantiles[column][q]
    quantile_errors: dict[str, dict[float, float]] = field(default_factory=dict)
    # column -> the levels whose search some node cut short (withheld counts): approximate
    quantile_approximate: dict[str, list[float]] = field(default_factory=dict)
    # column -> the nodes whose values the quantiles are over (fewer than contributors if some refused)
    quantile_nodes: dict[str, list[str]] = field(default_factory=dict)
    # column -> {node: why} for nodes that refused that column's quantile thresholds
    quantile_refused: dict[str, dict[str, str]] = field(default_factory=dict)
    # node -> {column: distinct thresholds / edges it will still answer}, as of its latest reply
    allowances: dict[str, dict[str, int]] = field(default_factory=dict)
    # column -> the coarsest grid step to which the nodes round its thresholds and edges
    resolutions: dict[str, float] = field(default_factory=dict)
    # under secure aggregation (stats(..., secagg=True)): the session, its threshold, survivors, dropped
    secure: dict[str, Any] | None = None
    # under differential privacy (stats(..., epsilon=...)): per node, what the answer cost and its noise
    dp: dict[str, DPSpent] = field(default_factory=dict)

    # -- who took part -----------------------------------------------------------------------
    @property
    def answered(self) -> list[str]:
        return list(self.replies)

    def column_refusals(self) -> dict[str, dict[str, str]]:
        """``{node: {column or "column.stat": why}}`` for what a node withheld."""
        return {n: dict(r.refused) for n, r in self.replies.items() if r.refused}

    def participation(self) -> pd.DataFrame:
        rows = [{"node": self.node_names.get(n, n), "node_id": n, "status": "answered",
                 "detail": "; ".join(f"{k}: {v}" for k, v in r.refused.items())} for n, r in self.replies.items()]
        for status, source in (("refused", self.refused), ("failed", self.failed), ("missing", self.missing)):
            rows += [{"node": self.node_names.get(n, n), "node_id": n, "status": status, "detail": why}
                     for n, why in source.items()]
        return pd.DataFrame(rows, columns=["node", "node_id", "status", "detail"])

    # -- global figures ----------------------------------------------------------------------
    def _scalar_columns(self) -> list[str]:
        wanted = [s for s in SCALAR_ORDER if s in self.stats]
        if "quantiles" in self.stats:
            wanted += [f"q{q:g}" for q in self.quantile_levels]
        return wanted

    def global_stats(self) -> pd.DataFrame:
        """One row per column, one column per statistic, plus how many nodes contributed."""
        rows: dict[str, dict[str, Any]] = {}
        for column, merged in self.numeric.items():
            row = {"count": merged.count, "missing": merged.missing, "sum": merged.sum, "mean": merged.mean,
                   "var": merged.var, "std": merged.std, "min": _nan(merged.min), "max": _nan(merged.max)}
            for q, value in self.quantiles.get(column, {}).items():
                row[f"q{q:g}"] = value
                if q == 0.5:
                    row["median"] = value
            rows[column] = row
        for column, cat in self.categorical.items():
            rows.setdefault(column, {"count": cat.count, "missing": cat.missing})
        wanted = self._scalar_columns()
        frame = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=wanted)
        frame["nodes"] = [len(self.contributors.get(c, [])) for c in frame.index]
        frame.index.name = "column"
        # quantiles that are estimates within a bound, not exact (see quantile_bounds() and notes())
        frame.attrs["approximate_quantiles"] = {c: list(qs) for c, qs in self.quantile_approximate.items() if qs}
        return frame

    def quantile_bounds(self) -> pd.DataFrame:
        """One row per (column, q): the quantile, the half-width within which the pooled quantile
        lies (0 when exact; inf with a NaN value when it could not be bracketed), the interval
        ``[low, high]``, whether it is approximate (nodes withheld the counts that would have
        located it), the nodes it is over and the nodes' threshold grid step."""
        rows = []
        for column, values in self.quantiles.items():
            errors = self.quantile_errors.get(column, {})
            approx = set(self.quantile_approximate.get(column, []))
            for q, value in values.items():
                half = errors.get(q, 0.0 if value == value else math.inf)
                rows.append({"column": column, "q": q, "value": value, "half_width": half,
                             "low": value - half, "high": value + half,
                             "approximate": q in approx or value != value or bool(self.dp),
                             "nodes": len(self.quantile_nodes.get(column, self.contributors.get(column, []))),
                             "resolution": self.resolutions.get(column, math.nan)})
        columns = ["column", "q", "value", "half_width", "low", "high", "approximate", "nodes", "resolution"]
        return pd.DataFrame(rows, columns=columns).set_index(["column", "q"])

    def allowance(self) -> pd.DataFrame:
        """Node x column: how many more distinct thresholds and histogram edges each node will
        answer this researcher on that column (its ``disclosure.threshold_allowance`` left), as of
        its latest reply; <NA> where it did not say."""
        columns = list(dict.fromkeys(c for per in self.allowances.values() for c in per))
        nodes = [n for n in self.allowances if self.allowances[n]]
        frame = pd.DataFrame({c: pd.array([self.allowances[n].get(c) for n in nodes], dtype="Int64")
                              for c in columns}, index=pd.Index([self.node_names.get(n, n) for n in nodes],
                                                                name="node"))
        frame.columns.name = "column"
        return frame

    def withheld_levels(self) -> pd.DataFrame:
        """Node x categorical column: how many value-count levels each node withheld (too rare to
        disclose; never named), 0 where it withheld none."""
        columns = [c for c, m in self.categorical.items() if m.withheld_levels or m.value_counts or m.suppressed]
        nodes = list(dict.fromkeys(n for c in columns for n in self.contributors.get(c, [])))
        frame = pd.DataFrame({c: [self.categorical[c].withheld_levels.get(n, 0) for n in nodes] for c in columns},
                             index=pd.Index([self.node_names.get(n, n) for n in nodes], name="node"),
                             dtype="int64")
        frame.columns.name = "column"
        return frame

    def node_stats(self) -> pd.DataFrame:
        """Each node's own figures: one row per (node, column). Under secure aggregation they are hidden:
        one row per node that says so (the researcher only ever received their sum)."""
        if self.secure is not None:
            return pd.DataFrame(
                [{"node": self.node_names.get(n, n),
                  "figures": "hidden: securely aggregated, only the sum over "
                             f"{len(self.secure['survivors'])} nodes is known (global_stats())"}
                 for n in self.secure["survivors"]],
                columns=["node", "figures"]).set_index("node")
        records = []
        for node_id, reply in self.replies.items():
            name = self.node_names.get(node_id, node_id)
            for column, p in reply.numeric.items():
                var = p.m2 / (p.count - 1) if p.count > 1 else math.nan
                records.append({"node": name, "column": column, "count": p.count, "missing": p.missing,
                                "sum": p.sum, "mean": p.mean if p.count else math.nan, "var": var,
                                "std": math.sqrt(var) if var == var else math.nan, "min": _nan(p.min),
                                "max": _nan(p.max)})
            for column, c in reply.categorical.items():
                if column not in reply.numeric:
                    records.append({"node": name, "column": column, "count": c.count, "missing": c.missing})
        wanted = [s for s in ("count", "missing", "sum", "mean", "var", "std", "min", "max") if s in self.stats]
        frame = pd.DataFrame(records)
        if frame.empty:
            return frame
        return frame.set_index(["node", "column"]).reindex(columns=wanted)

    def histogram(self, column: str) -> pd.DataFrame:
        merged = self.numeric[column]
        if merged.histogram is None or merged.histogram_edges is None:
            raise KeyError(f"no histogram was computed for {column!r}")
        edges = merged.histogram_edges
        suppressed = merged.histogram_suppressed
        holders = [n for n, r in self.replies.items() if column in r.numeric]
        withheld = [self.node_names.get(n, n) for n in holders if self.replies[n].numeric[column].histogram is None]
        frame = pd.DataFrame({
            "left": edges[:-1], "right": edges[1:], "count": merged.histogram,
            "suppressed_on": [", ".join(self.node_names.get(n, n) for n in suppressed.get(i, []))
                              for i in range(len(edges) - 1)],
            "nodes": len(holders) - len(withheld),
        })
        frame.attrs["withheld_by"] = withheld  # nodes whose rules refused this histogram (see notes())
        return frame

    def value_counts(self, column: str) -> pd.DataFrame:
        """Counts per value; a value withheld by every node that has it shows <NA>, never 0."""
        merged = self.categorical[column]
        series = merged.to_series()
        hidden = sorted(v for v in merged.suppressed if v not in merged.value_counts)
        values = [*series.index, *hidden]
        frame = pd.DataFrame({
            "value": values,
            "count": pd.array([*series.to_numpy().tolist(), *[None] * len(hidden)], dtype="Int64"),
            "suppressed_on": [", ".join(self.node_names.get(n, n) for n in merged.suppressed.get(v, []))
                              for v in values],
        })
        # nodes that withheld levels without naming them: the counts of values they did not name
        # (listed in suppressed_on) are lower bounds
        frame.attrs["withheld_levels"] = {self.node_names.get(n, n): k for n, k in merged.withheld_levels.items()}
        return frame

    def crosstab(self) -> pd.DataFrame:
        if self.crosstab_table is None:
            raise KeyError("no crosstab was computed")
        return self.crosstab_table

    def cov(self) -> pd.DataFrame:
        if self.covariance is None:
            raise KeyError("no covariance was computed")
        return self.covariance

    def corr(self) -> pd.DataFrame:
        if self.correlation is None:
            raise KeyError("no correlation was computed")
        return self.correlation

    def privacy(self) -> pd.DataFrame:
        """Per node, under differential privacy: the ε and δ this answer spent, what remains of this
        researcher's budget there, the mechanism and the largest noise scale of its figures."""
        rows = [{"node": self.node_names.get(n, n), "epsilon_spent": s.epsilon, "delta_spent": s.delta,
                 "epsilon_remaining": s.balance.epsilon_remaining, "delta_remaining": s.balance.delta_remaining,
                 "epsilon_budget": s.balance.epsilon_budget, "mechanism": s.mechanism,
                 "max_noise_scale": max(s.noise.values(), default=math.nan)} for n, s in self.dp.items()]
        columns = ["node", "epsilon_spent", "delta_spent", "epsilon_remaining", "delta_remaining", "epsilon_budget",
                   "mechanism", "max_noise_scale"]
        return pd.DataFrame(rows, columns=columns).set_index("node")

    def noise(self) -> pd.DataFrame:
        """Node x released figure ("age.sum", "sex.value_counts", ...): the noise scale each node added (the
        Laplace scale b, std b·√2; or the Gaussian σ), from which the error of every figure follows."""
        figures = list(dict.fromkeys(f for s in self.dp.values() for f in s.noise))
        frame = pd.DataFrame([[s.noise.get(f, math.nan) for f in figures] for s in self.dp.values()],
                             index=pd.Index([self.node_names.get(n, n) for n in self.dp], name="node"),
                             columns=figures)
        frame.columns.name = "figure"
        return frame

    def notes(self) -> list[str]:
        """One line per thing the reader must know: refusals, failures, silences, withheld columns."""
        lines = []
        if self.dp:
            costs = sorted({s.epsilon for s in self.dp.values()})
            mechanism = ", ".join(sorted({s.mechanism for s in self.dp.values()}))
            left = min(s.balance.epsilon_remaining for s in self.dp.values())
            lines.append(f"differentially private ({mechanism}): each node spent epsilon "
                         f"{'/'.join(f'{e:.3g}' for e in costs)}; the least left on a node is {left:.3g}. Every "
                         "figure carries noise (privacy() and noise() give its scale per node)")
        if self.secure is not None:
            dropped = self.secure["dropped"]
            lines.append(f"securely aggregated over {len(self.secure['survivors'])} nodes (threshold "
                         f"{self.secure['threshold']}): the per-node figures were never received, only their sum"
                         + (f"; {', '.join(self.node_names.get(n, n) for n in dropped)} dropped out after set-up "
                            "and are not in it" if dropped else ""))
        for label, source in (("refused", self.refused), ("failed", self.failed), ("no answer", self.missing)):
            lines += [f"{self.node_names.get(n, n)} {label}: {why}" for n, why in source.items()]
        for node, withheld in self.column_refusals().items():
            lines += [f"{self.node_names.get(node, node)} withheld {key}: {why}" for key, why in withheld.items()]
        lines += self._quantile_notes()
        for column, merged in self.categorical.items():
            lines += [f"{self.node_names.get(n, n)} withheld {k} level{'s' if k != 1 else ''} of {column!r} too rare "
                      "to disclose (not named): the counts of values it did not name are lower bounds"
                      for n, k in merged.withheld_levels.items()]
        for node, per in self.allowances.items():
            spent = [c for c, left in per.items() if left <= 0]
            if spent:
                lines.append(f"{self.node_names.get(node, node)} has no threshold allowance left on "
                             f"{', '.join(map(repr, spent))}: it will withhold new quantile thresholds and "
                             "histogram edges there")
        return lines

    def _quantile_notes(self) -> list[str]:
        lines = []
        for column, refused in self.quantile_refused.items():
            if not refused:
                continue
            who = ", ".join(self.node_names.get(n, n) for n in refused)
            used = self.quantile_nodes.get(column, [])
            if used:
                lines.append(f"quantiles of {column!r} are over {len(used)} node{'s' if len(used) != 1 else ''} "
                             f"only: {who} refused them")
            else:
                lines.append(f"quantiles of {column!r} are NaN: every node holding values refused them ({who})")
        for column, levels in self.quantile_approximate.items():
            if not levels or self.dp:
                continue
            values, errors = self.quantiles.get(column, {}), self.quantile_errors.get(column, {})
            unknown = "unknown (the counts the nodes may release cannot bracket it)"
            parts = [f"q{q:g} {unknown}" if math.isnan(values.get(q, math.nan))
                     else f"q{q:g} = {values[q]:.6g} ± {errors.get(q, math.nan):.3g}" for q in levels]
            lines.append(f"quantiles of {column!r} are approximate (nodes withheld the counts that would locate them "
                         f"more finely): {'; '.join(parts)}")
        return lines

    def __repr__(self) -> str:
        head = f"FAResult: {len(self.replies)} nodes answered"
        return "\n".join([head, *self.notes(), self.global_stats().to_string()])

    def _repr_html_(self) -> str:
        notes = "".join(f"<li>{html.escape(line)}</li>" for line in self.notes())
        return (f"<p>{len(self.replies)} nodes answered</p>" + (f"<ul>{notes}</ul>" if notes else "")
                + str(self.global_stats().to_html()))


def _nan(value: float | None) -> float:
    """Withheld figures show as NaN in frames (the notes say who withheld them and why)."""
    return math.nan if value is None else value


def contributors(replies: Mapping[str, FAReply], column: str) -> list[str]:
    return [n for n, r in replies.items() if column in r.numeric or column in r.categorical]
