"""The node's answer to an FARequest: partial statistics over one dataset, after disclosure rules.

Order of checks, so that a refusal is always explicit: analytics switched on at all, the
dataset known and tabular, the dataset large enough (min_count), the requested columns
present; then partials are computed exactly and the operator's rules applied to them before
anything leaves the node. CSV files are read once and cached until the file changes, so a
sequence of requests (a quantile search takes several rounds) costs one read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedlab.analytics.disclosure import DisclosureRules, apply_rules, check_enabled
from fedlab.analytics.messages import STATISTICS, CategoricalPartial, FAReply, FARequest, NumericPartial
from fedlab.analytics.partials import (
    categorical_partial,
    covariance_partial,
    crosstab_partial,
    is_numeric,
    numeric_partial,
)
from fedlab.errors import FedlabDatasetError, FedlabDisclosureError, FedlabProtocolError
from fedlab.node.registry import DatasetRecord, DatasetRegistry

__all__ = ["AnalyticsHandler", "CsvCache"]

log = logging.getLogger("fedlab.node")


class CsvCache:
    """DataFrames of registered CSV datasets, re-read only when the file changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frames: dict[str, tuple[tuple[int, int], pd.DataFrame]] = {}

    def load(self, path: str) -> pd.DataFrame:
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise FedlabDatasetError(
                f"the dataset's file is no longer readable on this node ({exc.strerror}); "
                "the node's operator should register it again"
            ) from None
        key = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._frames.get(path)
            if cached is not None and cached[0] == key:
                return cached[1]
        frame = pd.read_csv(path)
        with self._lock:
            self._frames[path] = (key, frame)
        return frame


class AnalyticsHandler:
    def __init__(self, registry: DatasetRegistry, rules: DisclosureRules, *, node_id: str) -> None:
        self.registry = registry
        self.rules = rules
        self.cache = CsvCache()
        self._node_id = node_id

    def _rng(self, dataset_id: str, path: str) -> np.random.Generator:
        """The same noise for the same dataset on every request, so that asking again and again
        cannot average it away; seeded from what only this node knows (the file's path)."""
        digest = hashlib.sha256(f"{self._node_id}|{dataset_id}|{path}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "big"))

    def __call__(self, request: FARequest) -> FAReply:
        check_enabled(self.rules)
        self.check_stats(request)
        record = self.registry.get(request.dataset_id)
        if record.data_type != "csv":
            raise FedlabDatasetError(
                f"dataset {record.name} holds {record.data_type}; statistics need a CSV dataset")
        frame = self.cache.load(str(Path(record.path)))
        return self.answer(request, frame, record)

    def answer(self, request: FARequest, frame: pd.DataFrame, record: DatasetRecord) -> FAReply:
        """Partials of ``frame`` (``record``'s data, possibly transformed in memory by a
        preprocessing chain) after the disclosure rules: the one place where they are applied."""
        if len(frame) < self.rules.min_count:
            raise FedlabDisclosureError(
                f"min_count: dataset {record.name} has {len(frame)} rows, fewer than this node's minimum "
                f"of {self.rules.min_count} (disclosure.min_count); no statistic can leave this node")
        columns = self._columns(request, frame)
        reply = self._partials(request, frame, columns, record.dataset_id)
        asked_min_max = [c for c in columns if {"min", "max"} & set(self._stats_for(request, c))]
        rng = self._rng(record.dataset_id, str(record.path))
        return apply_rules(reply, self.rules, rng=rng, asked_min_max=asked_min_max)

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

    def _columns(self, request: FARequest, frame: pd.DataFrame) -> list[str]:
        wanted = list(request.columns) or list(request.stats_args) or [
            c for c in frame.columns if c not in self.rules.excluded_columns]
        absent = [c for c in [*wanted, *request.crosstab] if c not in frame.columns]
        if absent:
            raise FedlabDatasetError(f"columns {absent} are not in this dataset; it has {list(frame.columns)}")
        return wanted

    def _partials(self, request: FARequest, frame: pd.DataFrame, columns: Sequence[str],
                  dataset_id: str) -> FAReply:
        """Exact partials for what was asked, and nothing more (value counts only on request)."""
        numeric: dict[str, NumericPartial] = {}
        categorical: dict[str, CategoricalPartial] = {}
        refused: dict[str, str] = {}
        for column in columns:
            if column in self.rules.excluded_columns:
                refused[column] = "excluded by the node's operator (disclosure.excluded_columns)"
                continue
            series = frame[column]
            stats = set(self._stats_for(request, column))
            args: dict[str, Any] = request.stats_args.get(column, {})
            if "value_counts" in stats or not is_numeric(series):
                dropna = bool(args.get("value_counts", {}).get("dropna", True))
                partial = categorical_partial(series, dropna=dropna)
                if "value_counts" not in stats:  # only count and missing were asked of this column
                    partial = CategoricalPartial(count=partial.count, missing=partial.missing, value_counts={})
                categorical[column] = partial
            if is_numeric(series) and stats - {"value_counts"}:
                edges = args.get("histogram", {}).get("edges") if "histogram" in stats else None
                numeric[column] = numeric_partial(
                    series,
                    with_min_max=bool({"min", "max"} & stats),
                    histogram_edges=edges,
                    thresholds=request.thresholds.get(column),
                )
        crosstab = None
        if request.crosstab:
            if len(request.crosstab) != 2:
                raise FedlabProtocolError("a crosstab needs exactly two columns", code="invalid_field",
                                          field="crosstab")
            crosstab = crosstab_partial(frame, request.crosstab[0], request.crosstab[1])
        covariance = None
        if {"cov", "corr"} & set(request.stats):
            covariance = covariance_partial(frame, list(numeric))
        return FAReply(dataset_id=dataset_id, n_rows=len(frame), numeric=numeric, categorical=categorical,
                       crosstab=crosstab, covariance=covariance, refused=refused)
