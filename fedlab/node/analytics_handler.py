"""The node's answer to an FARequest: partial statistics over one dataset, after disclosure rules.

Order of checks, so that a refusal is always explicit: analytics switched on at all, the request
within this node's caps, the dataset known and tabular, large enough (min_count), the requested
columns present; then partials are computed exactly and the operator's rules applied to them
before anything leaves the node.

Every rule follows the data, not the names (see :mod:`fedlab.privacy`): a dataset made by
preprocessing on this node is answered from its *root* source and the chain of steps that made
it, so that every column knows its source columns and its real (not imputed) rows; exclusions,
``min_count``, noise, levels, groups and the threshold state are those of the source columns.
CSV files are read once and cached until the file changes, so a sequence of requests (a
quantile search takes several rounds) costs one read.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pandas as pd

from fedlab.analytics.disclosure import DisclosureRules, apply_rules, check_enabled
from fedlab.analytics.messages import (
    STATISTICS,
    CategoricalPartial,
    CovariancePartial,
    CrosstabPartial,
    FAReply,
    FARequest,
    NumericPartial,
)
from fedlab.analytics.partials import (
    categorical_partial,
    covariance_partial,
    crosstab_partial,
    is_numeric,
    numeric_partial,
)
from fedlab.errors import FedlabDatasetError, FedlabDisclosureError, FedlabProtocolError
from fedlab.node.dataset_view import CsvCache, LoadedData, apply_tracked
from fedlab.node.preproc_state import PreprocStateStore
from fedlab.node.privacy_state import CutSession, PrivacyState
from fedlab.node.registry import DatasetRecord, DatasetRegistry
from fedlab.privacy import cuts
from fedlab.privacy.dp_rules import DPRules
from fedlab.privacy.groups import group_refusal, level_counts, levels_refusal, moments_refusal, suppressed_levels
from fedlab.privacy.noise import noise_fractions, noisy_range
from fedlab.privacy.provenance import VALUE, initial

__all__ = ["INSECURE_PEER", "AnalyticsHandler", "CsvCache", "LoadedData", "apply_tracked"]

log = logging.getLogger("fedlab.node")
INSECURE_PEER = "insecure"
_CROSSTAB = "crosstab"
_COV = "cov"


class AnalyticsHandler:
    #: the operator's [privacy] rules (DP bounds and categories), set by the Dispatcher
    dp_rules: DPRules = DPRules()

    def __init__(self, registry: DatasetRegistry, rules: DisclosureRules, *, node_id: str,
                 peer: str = INSECURE_PEER) -> None:
        self.registry = registry
        self.rules = rules
        self.cache = CsvCache()
        self._node_id = node_id
        self.peer = peer or INSECURE_PEER
        self.privacy = PrivacyState(registry.db_path)
        self.states = PreprocStateStore(registry.db_path)

    # -- the dataset as a request sees it ------------------------------------------------------
    def resolve(self, record: DatasetRecord) -> tuple[DatasetRecord, list[dict[str, Any]]]:
        """The root source dataset of ``record`` and the chain of steps that made it from there."""
        meta = record.metadata
        root_id, state_id = meta.get("root"), meta.get("state_id")
        if not root_id or not state_id:
            return record, []
        try:
            root = self.registry.get(str(root_id))
        except FedlabDatasetError:
            raise FedlabDatasetError(
                f"dataset {record.name} was derived on this node from a dataset that is no longer registered; "
                "its statistics follow its source, so they cannot be computed") from None
        return root, list(self.states.get(str(state_id))[2])

    def load(self, record: DatasetRecord, chain: Sequence[Mapping[str, Any]] | None = None) -> LoadedData:
        """``record``'s data as its root source transformed by ``chain`` (default: the chain that
        made ``record``; a preprocessing state's chain already starts from the root)."""
        if record.data_type != "csv":
            raise FedlabDatasetError(
                f"dataset {record.name} holds {record.data_type}; statistics need a CSV dataset")
        root, base = self.resolve(record)
        steps: list[dict[str, Any]] = [dict(s) for s in (base if chain is None else chain)]
        source, digest = self.cache.load_with_digest(str(Path(root.path)))
        frame, origins = apply_tracked(source, initial(source), steps)
        return LoadedData(frame=frame, origins=origins, source=source, root=root, digest=digest, chain=steps)

    # -- answering -----------------------------------------------------------------------------
    def __call__(self, request: FARequest) -> FAReply:
        check_enabled(self.rules)
        self.check_stats(request)
        self.check_caps(request)
        record = self.registry.get(request.dataset_id)
        return self.answer(request, self.load(record), record)

    def check_caps(self, request: FARequest) -> None:
        """Refuse a request over this node's caps before any data is read."""
        n_points = sum(len(ts) for ts in request.thresholds.values())
        for args in request.stats_args.values():
            edges = args.get("histogram", {}).get("edges") if isinstance(args.get("histogram"), dict) else None
            if isinstance(edges, list):
                n_points += len(edges)
        if n_points > self.rules.max_thresholds:
            raise FedlabDisclosureError(
                f"max_thresholds: the request holds {n_points} thresholds and histogram edges, more than this "
                f"node's maximum of {self.rules.max_thresholds} per request (disclosure.max_thresholds)")

    def answer(self, request: FARequest, data: LoadedData, record: DatasetRecord) -> FAReply:
        """Partials of ``data`` after the disclosure rules: the one place where they are applied."""
        frame = data.frame
        if len(frame) < self.rules.min_count:
            raise FedlabDisclosureError(
                f"min_count: dataset {record.name} has {len(frame)} rows, fewer than this node's minimum "
                f"of {self.rules.min_count} (disclosure.min_count); no statistic can leave this node")
        columns = self._columns(request, data)
        reply, noisy = self._partials(request, data, columns, record.dataset_id)
        asked_min_max = [c for c in columns if {"min", "max"} & set(self._stats_for(request, c))]
        return apply_rules(reply, self.rules, rng=np.random.default_rng(0), asked_min_max=asked_min_max,
                           noisy=noisy)

    @staticmethod
    def check_stats(request: FARequest) -> None:
        """Refuse statistics this node does not know, before any data is read."""
        unknown = sorted(set(request.stats) - set(STATISTICS))
        if unknown:
            raise FedlabProtocolError(
                f"unknown statistics {unknown}; known: {list(STATISTICS)}", code="invalid_field", field="stats")

    @staticmethod
    def _stats_for(request: FARequest, column: str) -> list[str]:
        """Per-column arguments, when given, say exactly what each column is asked for."""
        if request.stats_args:
            return list(request.stats_args.get(column, {}))
        return list(request.stats)

    def _excluded(self, data: LoadedData, column: str) -> bool:
        origin = data.origins.get(column)
        sources = origin.sources if origin is not None else {column}
        return bool(set(sources) & set(self.rules.excluded_columns))

    def _columns(self, request: FARequest, data: LoadedData) -> list[str]:
        frame = data.frame
        wanted = list(request.columns) or list(request.stats_args) or [
            c for c in frame.columns if not self._excluded(data, str(c))]
        absent = [c for c in [*wanted, *request.crosstab] if c not in frame.columns]
        if absent:
            raise FedlabDatasetError(f"columns {absent} are not in this dataset; it has {list(frame.columns)}")
        return list(dict.fromkeys(wanted))

    # -- per column ----------------------------------------------------------------------------
    def _refusal(self, data: LoadedData, column: str) -> str | None:
        if self._excluded(data, column):
            return "excluded by the node's operator (disclosure.excluded_columns), or made from such a column"
        real = data.origins[column].real_count
        if real < self.rules.min_count:
            return (f"min_count: {real} real (measured, not imputed) values, fewer than this node's minimum of "
                    f"{self.rules.min_count} (disclosure.min_count)")
        return None

    def _partials(self, request: FARequest, data: LoadedData, columns: Sequence[str], dataset_id: str,
                  ) -> tuple[FAReply, dict[str, tuple[float, float]]]:
        """Exact partials for what was asked, and nothing more, with the rules that need the data."""
        frame = data.frame
        numeric: dict[str, NumericPartial] = {}
        categorical: dict[str, CategoricalPartial] = {}
        refused: dict[str, str] = {}
        allowance: dict[str, int] = {}
        noisy: dict[str, tuple[float, float]] = {}
        for column in columns:
            if (why := self._refusal(data, column)) is not None:
                refused[column] = why
                continue
            series = frame[column]
            stats = set(self._stats_for(request, column))
            args: dict[str, Any] = request.stats_args.get(column, {})
            counts: Mapping[str, int] | None = None
            if "value_counts" in stats or not is_numeric(series):
                counts = level_counts(series)
                partial = categorical_partial(series, dropna=bool(_arg(args, "value_counts", "dropna", True)))
                if "value_counts" in stats and (why := levels_refusal(column, counts, self.rules)) is not None:
                    refused[f"{column}.value_counts"] = why
                    partial = CategoricalPartial(count=partial.count, missing=partial.missing, value_counts={})
                elif "value_counts" not in stats:  # only count and missing were asked of this column
                    partial = CategoricalPartial(count=partial.count, missing=partial.missing, value_counts={})
                categorical[column] = partial
            if is_numeric(series) and stats - {"value_counts"}:
                counts = counts if counts is not None else level_counts(series)
                if (why := moments_refusal(column, counts, self.rules)) is not None:
                    refused[column] = why
                    categorical.pop(column, None)
                    continue
                part, fence = self._numeric(request, data, column, stats, args, refused, allowance)
                numeric[column] = part
                noisy[column] = fence
        crosstab = self._crosstab(request, data, refused) if request.crosstab else None
        covariance = None
        if {"cov", "corr"} & set(request.stats):
            covariance = self._covariance(data, list(numeric), refused)
        return (FAReply(dataset_id=dataset_id, n_rows=len(frame), numeric=numeric, categorical=categorical,
                        crosstab=crosstab, covariance=covariance, refused=refused, allowance=allowance), noisy)

    def _numeric(self, request: FARequest, data: LoadedData, column: str, stats: set[str], args: dict[str, Any],
                 refused: dict[str, str], allowance: dict[str, int],
                 ) -> tuple[NumericPartial, tuple[float, float]]:
        series = data.frame[column]
        origin = data.origins[column]
        part = numeric_partial(series, with_min_max=bool({"min", "max"} & stats))
        source = self._source_values(data, column)
        if source is None:  # an indicator (or a column not read as numbers at its source): its own values
            own = np.sort(_floats(series[origin.real]))
            fence = self._fence(data, column, own)
        else:
            fence_src = self._fence(data, origin.source, source)
            fence = (origin.from_source(fence_src[0]), origin.from_source(fence_src[1]))
        imputed = self._imputed(data, column)
        if imputed.size:  # the released range covers imputed values too, which the researcher chose and knows
            fence_out = (min(fence[0], float(imputed[0])), max(fence[1], float(imputed[-1])))
        else:
            fence_out = fence
        edges = args.get("histogram", {}).get("edges") if "histogram" in stats else None
        thresholds = request.thresholds.get(column)
        levels = _arg(args, "quantiles", "levels", None)
        most = origin.real_count // self.rules.min_count
        if thresholds is not None and isinstance(levels, list) and len(levels) > most:
            refused[f"{column}.quantiles"] = (
                f"min_count: {len(levels)} quantile levels over {origin.real_count} values; this node answers at "
                f"most {most} (one per {self.rules.min_count} values, disclosure.min_count)")
            thresholds = None
        if edges is None and thresholds is None:
            return part, fence_out
        if source is None:
            refused[f"{column}.thresholds"] = ("thresholds and histogram edges are answered for value columns only; "
                                               f"{column} is a one-hot indicator (use its sum or value counts)")
            return msgspec.structs.replace(part, histogram_edges=None, histogram=None, below=None), fence_out
        # the cut state is read, spent and written in one short transaction, before the answer is sent
        with self.privacy.cuts(self.peer, data.source_key) as session:
            part = self._cuts(session, data, column, part, edges, thresholds, source, fence_src, imputed, refused,
                              allowance)
        return part, fence_out

    def _source_values(self, data: LoadedData, column: str) -> np.ndarray | None:
        """The sorted real values of ``column``'s source column, in the source's units, or None."""
        origin = data.origins[column]
        if origin.kind != VALUE or origin.source not in data.source.columns:
            return None
        try:
            return np.sort(_floats(data.source[origin.source][origin.real]))
        except (TypeError, ValueError, OverflowError):
            return None

    @staticmethod
    def _imputed(data: LoadedData, column: str) -> np.ndarray:
        series = data.frame[column]
        mask = series.notna().to_numpy() & ~data.origins[column].real
        return np.sort(_floats(series[mask])) if mask.any() else np.empty(0)

    def _cuts(self, session: CutSession, data: LoadedData, column: str, part: NumericPartial, edges: Any,
              thresholds: list[float] | None, source: np.ndarray, fence: tuple[float, float],
              imputed: np.ndarray, refused: dict[str, str], allowance: dict[str, int]) -> NumericPartial:
        """The histogram and the counts below thresholds that the cut rules let out (fedlab.privacy.cuts).

        Every point is judged and rounded in the source column's units: a derived copy's point is
        mapped back through the copy's affine map, so every copy shares one grid, one set of cuts
        and one allowance. Counts include the imputed values, which the researcher knows.
        """
        origin = data.origins[column]
        rules = self.rules
        step = cuts.grid_step(source, rules.threshold_resolution)
        state = session.load(origin.source, rules.threshold_allowance)
        reasons: list[str] = []

        counted_at: list[float] = []

        def count(asked: Sequence[float], sides: Sequence[str]) -> list[int | None]:
            points = [cuts.Point(cuts.snap(origin.to_source(float(t)), step), side)
                      for t, side in zip(asked, sides, strict=True)]
            counted_at[:] = [origin.from_source(p.value) for p in points]
            ranks, why = cuts.answer_points(points, source, fence=fence, state=state, key_prefix=origin.source,
                                            min_count=rules.min_count, cell_threshold=rules.cell_threshold)
            reasons.extend(why)
            return [None if r is None else r + _rank(imputed, cuts.Point(origin.from_source(p.value), p.side))
                    for p, r in zip(points, ranks, strict=True)]

        histogram_edges = histogram = None
        if edges is not None:
            checked = numeric_partial(data.frame[column].iloc[:0], histogram_edges=edges).histogram_edges
            assert checked is not None  # validated: finite, increasing
            cum = count(checked, [cuts.LEFT] * (len(checked) - 1) + [cuts.RIGHT])
            histogram = [None if a is None or b is None else b - a for a, b in zip(cum, cum[1:], strict=False)]
            histogram_edges = checked
        below: list[int | None] | None = None
        if thresholds is not None:
            numeric_partial(data.frame[column].iloc[:0], thresholds=thresholds)  # validates the thresholds
            below = count(thresholds, [cuts.RIGHT] * len(thresholds))
        below_at = list(counted_at) if thresholds is not None else None
        session.save(origin.source, state)
        allowance[column] = state.remaining
        if reasons:
            refused[f"{column}.thresholds"] = _withheld(reasons, rules)
        return msgspec.structs.replace(part, histogram_edges=histogram_edges, histogram=histogram, below=below,
                                       resolution=step * origin.scale, below_at=below_at)

    def _fence(self, data: LoadedData, key: str, values_sorted: np.ndarray) -> tuple[float, float]:
        """The noisy outward range of sorted real values, fixed per (node secret, source content,
        ``key``: the source column). With ``min_max = "off"`` it lies at least ``min_max_noise`` of
        the range outside the data, since only answers beyond it (0 or everything) ever show it."""
        if values_sorted.size == 0:
            return (math.inf, -math.inf)
        lo, hi = float(values_sorted[0]), float(values_sorted[-1])
        if self.rules.min_max == "exact":
            return lo, hi
        u_lo, u_hi = noise_fractions(self.privacy.secret, data.digest, key)
        if self.rules.min_max == "off":
            u_lo, u_hi = 1.0 + u_lo, 1.0 + u_hi
        return noisy_range(lo, hi, self.rules.min_max_noise, (u_lo, u_hi))

    # -- tables ----------------------------------------------------------------------------------
    def _crosstab(self, request: FARequest, data: LoadedData, refused: dict[str, str]) -> CrosstabPartial | None:
        if len(request.crosstab) != 2:
            raise FedlabProtocolError("a crosstab needs exactly two columns", code="invalid_field", field="crosstab")
        rows, cols = request.crosstab
        hidden: dict[str, set[str]] = {}
        for column in (rows, cols):
            if self._excluded(data, column):
                refused[_CROSSTAB] = f"excluded by the node's operator (disclosure.excluded_columns): {column}"
                return None
            counts = level_counts(data.frame[column])
            if (why := levels_refusal(column, counts, self.rules)) is not None:
                refused[_CROSSTAB] = why
                return None
            hidden[column] = suppressed_levels(counts, self.rules.cell_threshold)
            present = data.frame[column].notna().to_numpy()
            if (why := _imputed_subset(column, present, data.origins[column].real, self.rules)) is not None:
                refused[_CROSSTAB] = why
                return None
        both = data.origins[rows].real & data.origins[cols].real
        if int(both.sum()) < self.rules.min_count:
            refused[_CROSSTAB] = (f"min_count: {int(both.sum())} rows with real values of both columns, fewer than "
                                  f"this node's minimum of {self.rules.min_count} (disclosure.min_count)")
            return None
        table = crosstab_partial(data.frame, rows, cols)
        # the levels the columns' own value counts suppress are left out of every table, unnamed
        cells = {r: {c: n for c, n in row.items() if c not in hidden[cols]}
                 for r, row in table.cells.items() if r not in hidden[rows]}
        return msgspec.structs.replace(table, cells={r: row for r, row in cells.items() if row})

    def _covariance(self, data: LoadedData, columns: list[str], refused: dict[str, str]) -> CovariancePartial | None:
        frame, rules = data.frame, self.rules
        for column in columns:
            counts = level_counts(frame[column])
            if (why := group_refusal(column, counts, rules)) is not None:
                refused[_COV] = why
                return None
        present = {c: frame[c].notna().to_numpy() for c in columns}
        real = {c: data.origins[c].real for c in columns}
        for column in columns:
            if (why := _imputed_subset(column, present[column], real[column], rules)) is not None:
                refused[_COV] = why
                return None
        for a in columns:
            for b in columns:
                n_real = int((real[a] & real[b]).sum())
                if n_real < rules.min_count:
                    refused[_COV] = (f"min_count: the pair ({a}, {b}) has {n_real} rows with real values of both, "
                                     f"fewer than this node's minimum of {rules.min_count} (disclosure.min_count)")
                    return None
                gap = int((present[a] & ~present[b]).sum())
                if 0 < gap < rules.min_count:
                    refused[_COV] = (
                        f"min_count: {a} has {gap} rows where {b} is missing; a covariance over the rest would "
                        f"single out that subset, smaller than this node's minimum of {rules.min_count} "
                        "(disclosure.min_count)")
                    return None
        return covariance_partial(frame, columns)


def _imputed_subset(column: str, present: np.ndarray, real: np.ndarray, rules: DisclosureRules) -> str | None:
    """Imputed rows hold a value the researcher chose: a table or covariance over a column with a few
    of them could be differenced against one imputed with another value, singling those rows out."""
    n = int((present & ~real).sum())
    if 0 < n < rules.min_count:
        return (f"min_count: {column} has {n} imputed rows; a table or covariance with them could single that "
                f"subset out, smaller than this node's minimum of {rules.min_count} (disclosure.min_count)")
    return None


def _rank(values: np.ndarray, point: cuts.Point) -> int:
    return int(np.searchsorted(values, point.value, side="left" if point.side == cuts.LEFT else "right"))


def _arg(args: Mapping[str, Any], stat: str, key: str, default: Any) -> Any:
    table = args.get(stat)
    return table.get(key, default) if isinstance(table, Mapping) else default


def _floats(series: pd.Series) -> np.ndarray:
    present = series.dropna()
    return np.asarray(present.to_numpy(dtype=np.float64), dtype=np.float64)


def _withheld(reasons: Sequence[str], rules: DisclosureRules) -> str:
    texts = {
        "threshold_allowance": f"threshold_allowance: this researcher's {rules.threshold_allowance} distinct "
        "thresholds and edges on this column are spent (disclosure.threshold_allowance)",
        "min_count": f"min_count: fewer than {max(rules.min_count, rules.cell_threshold)} values would lie on one "
        "side (disclosure.min_count)",
        "cell_threshold": f"cell_threshold: the count would differ from an earlier answer on this column by fewer "
        f"than {rules.cell_threshold} values (disclosure.cell_threshold)",
    }
    counts = {r: reasons.count(r) for r in dict.fromkeys(reasons)}
    return "withheld " + "; ".join(f"{n} point(s) by {texts[r]}" for r, n in counts.items())
