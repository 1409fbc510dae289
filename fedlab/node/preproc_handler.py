"""The node's answer to a PreprocRequest: fit, set or apply one step of a preprocessing pipeline.

Every step starts from the *root* source dataset (a dataset derived on this node is followed
back to it) and re-applies the state's chain in memory, so the source file is never modified,
nothing but the chain needs to be kept between steps, and every derived column keeps its
provenance (see :mod:`fedlab.privacy.provenance`). A ``set`` step's spec comes from the
researcher and is validated against this node's rules and data before it is kept
(:func:`fedlab.privacy.spec_check.check_spec`).
A fit is an analytics request on the transformed data and goes through the very same
disclosure rules (see :meth:`AnalyticsHandler.answer`); when analytics are switched off,
preprocessing is too, since a fit reveals statistics. ComBat's node-local batch estimates
are computed here, kept in the state and never sent back.

A column of which the root source holds no measured value at all (a lab value a site never
measured) is answered "no values" (``PreprocReply.no_values``) rather than refused, so that the
researcher can fit the step on the sites that have values and apply it here too. The node decides
it from its own root source (:func:`fedlab.privacy.provenance.no_measured_values`), never from the
derived frame, and says nothing else about the column; a column with 1 to ``min_count - 1`` values
is refused as before. A kept value step must leave every finite value finite
(:func:`fedlab.privacy.spec_check.check_finite`), so no step can make values read as missing.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import pandas as pd

from fedlab.analytics.disclosure import DisclosureRules, check_enabled
from fedlab.analytics.messages import FAReply, FARequest
from fedlab.errors import FedlabDatasetError, FedlabDisclosureError, FedlabError, FedlabProtocolError
from fedlab.node.analytics_handler import AnalyticsHandler
from fedlab.node.dataset_view import LoadedData, apply_tracked
from fedlab.node.preproc_state import PreprocStateStore
from fedlab.node.registry import DatasetRecord, DatasetRegistry
from fedlab.preprocessing.messages import PREPROC_STEPS, PREPROC_TYPES, PreprocReply, PreprocRequest
from fedlab.privacy.provenance import no_measured_values
from fedlab.privacy.spec_check import check_finite, check_spec

__all__ = ["DERIVED_DIR", "PreprocHandler"]

log = logging.getLogger("fedlab.node")
DERIVED_DIR = "derived"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _invalid(message: str, field: str) -> FedlabProtocolError:
    return FedlabProtocolError(message, code="invalid_field", field=field)


class PreprocHandler:
    """Answers PreprocRequests for the datasets of ``registry``, within ``rules``."""

    def __init__(self, registry: DatasetRegistry, rules: DisclosureRules, *, node_id: str, node_dir: Path,
                 analytics: AnalyticsHandler | None = None) -> None:
        self.registry = registry
        self.rules = rules
        self.node_dir = Path(node_dir)
        # Sharing the dispatcher's analytics handler shares its CSV cache.
        self.analytics = analytics or AnalyticsHandler(registry, rules, node_id=node_id)
        self.states: PreprocStateStore = self.analytics.states

    def __call__(self, request: PreprocRequest) -> PreprocReply:
        if request.preproc_type not in PREPROC_TYPES:
            raise _invalid(f"unknown preprocessing type {request.preproc_type!r}; known: {list(PREPROC_TYPES)}",
                           "preproc_type")
        if request.preproc_step not in PREPROC_STEPS:
            raise _invalid(f"unknown preprocessing step {request.preproc_step!r}; known: {list(PREPROC_STEPS)}",
                           "preproc_step")
        check_enabled(self.rules)
        record = self.registry.get(request.dataset_id)
        if record.data_type != "csv":
            raise FedlabDatasetError(
                f"dataset {record.name} holds {record.data_type}; preprocessing needs a CSV dataset")
        chain: list[dict[str, Any]] | None = None  # None: the chain that made this dataset, if derived
        if request.state_id is not None:
            chain = self.states.get(request.state_id, record.dataset_id)[2]
        data = self.analytics.load(record, chain)
        if request.preproc_step == "fit":
            return self._fit(request, record, data)
        if request.preproc_step == "set":
            return self._set(request, record, data)
        return self._apply(request, record, data)

    def _fit(self, request: PreprocRequest, record: DatasetRecord, data: LoadedData) -> PreprocReply:
        args = request.preproc_args
        try:
            fa_request = msgspec.convert(
                {"dataset_id": record.dataset_id, "stats": args.get("stats", []), "columns": args.get("columns", []),
                 "stats_args": args.get("stats_args", {}), "thresholds": args.get("thresholds", {}),
                 "crosstab": []},
                FARequest)
        except msgspec.ValidationError as exc:
            raise _invalid(f"the fit's preproc_args are not a valid statistics request: {exc}",
                           "preproc_args") from exc
        self.analytics.check_stats(fa_request)
        self.analytics.check_caps(fa_request)
        empty = self._no_values(fa_request, data)
        if empty:
            fa_request = _without(fa_request, empty)
        if empty and not (fa_request.columns or fa_request.stats_args):
            # nothing else was asked (an empty list would mean "every column" to the analytics)
            partials = FAReply(dataset_id=record.dataset_id, n_rows=len(data.frame))
        else:
            partials = self.analytics.answer(fa_request, data, record)
        return PreprocReply(state_id=self.states.new(request.preproc_id, record.dataset_id, data.chain),
                            partials=partials, no_values=empty or None)

    def _no_values(self, request: FARequest, data: LoadedData) -> list[str]:
        """The named columns of ``request`` of which the root source holds no measured value.

        None on a dataset too small for any statistic (the analytics refuse it whole), and never an
        excluded column (refused as such) or one that is not in the data (the analytics say so).
        """
        if len(data.frame) < self.rules.min_count:
            return []
        empty = []
        for column in dict.fromkeys([*request.columns, *request.stats_args]):
            origin = data.origins.get(column)
            if origin is None or set(origin.sources) & set(self.rules.excluded_columns):
                continue
            if no_measured_values(origin, data.source):
                empty.append(column)
        return empty

    def _set(self, request: PreprocRequest, record: DatasetRecord, data: LoadedData) -> PreprocReply:
        spec = request.preproc_args.get("transform")
        if not isinstance(spec, dict) or spec.get("type") != request.preproc_type:
            raise _invalid(
                f"a set step needs preproc_args['transform'], a transform spec of type {request.preproc_type!r}",
                "preproc_args")
        columns = spec.get("columns", [])
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise _invalid("the transform's columns must be a list of column names", "preproc_args")
        frame = data.frame
        absent = [c for c in columns if c not in frame.columns]
        if absent:
            raise FedlabDatasetError(
                f"columns {absent} are not in this dataset after the pipeline's steps so far; "
                f"it has {list(frame.columns)}")
        spec = check_spec(spec, frame, data.origins, self.rules)  # the node's rules decide what the spec holds
        spec.pop("no_values", None)  # the node's own finding, never the researcher's
        empty = [c for c in columns if no_measured_values(data.origins[c], data.source)]
        if empty:
            spec["no_values"] = empty  # in this node's lineage: the step was fitted on the other sites
        if spec["type"] == "combat":
            spec = {**spec, **self._combat_local(frame, spec, empty)}
        after, _ = apply_tracked(frame, data.origins, [spec])  # a spec that cannot be applied is refused now
        check_finite(spec, frame, after)
        return PreprocReply(state_id=self.states.new(request.preproc_id, record.dataset_id, [*data.chain, spec]))

    @staticmethod
    def _combat_local(frame: pd.DataFrame, spec: Mapping[str, Any], empty: list[str]) -> dict[str, Any]:
        """This node's empirical Bayes batch estimates, from the global alpha and sigma; the columns
        it holds no value of (``empty``) are left out of its priors and left as they are."""
        from fedlab.preprocessing.combat import combat_local_params

        if not isinstance(spec.get("alpha"), Mapping) or not isinstance(spec.get("sigma"), Mapping):
            raise _invalid("a combat transform needs the global 'alpha' and 'sigma' per column", "preproc_args")
        try:
            gamma, delta = combat_local_params(frame, spec["columns"], spec["alpha"], spec["sigma"], without=empty)
        except FedlabError:
            raise
        except (KeyError, ValueError, TypeError, ZeroDivisionError) as exc:
            log.warning("ComBat's batch estimates failed: %s: %s", type(exc).__name__, exc)
            raise FedlabDatasetError(
                "ComBat's batch estimates cannot be computed on this node's data (the node's log has the "
                "details); check the step's columns") from exc
        # plain floats: the spec is stored as JSON and checked by the transforms as numbers
        return {"gamma_star": {c: float(v) for c, v in gamma.items()},
                "delta_star": {c: float(v) for c, v in delta.items()}}

    def _apply(self, request: PreprocRequest, record: DatasetRecord, data: LoadedData) -> PreprocReply:
        from fedlab.preprocessing.transforms import describe_spec

        args = request.preproc_args
        name, tags, description = args.get("name"), args.get("tags", []), args.get("description", "")
        if not isinstance(name, str) or not name.strip():
            raise _invalid("an apply step needs preproc_args['name'], the derived dataset's name", "preproc_args")
        chain = data.chain
        if request.state_id is None:
            raise _invalid("the pipeline has no steps yet: set at least one before apply", "state_id")
        frame = data.frame
        if frame.shape[0] * frame.shape[1] > self.rules.max_derived_cells:
            raise FedlabDisclosureError(
                f"max_derived_cells: the derived dataset would hold {frame.shape[0]} rows x {frame.shape[1]} columns, "
                f"more than this node's maximum of {self.rules.max_derived_cells} cells (disclosure.max_derived_cells)")
        state_id = self.states.new(request.preproc_id, record.dataset_id, chain)
        derived = self.node_dir / DERIVED_DIR
        derived.mkdir(parents=True, exist_ok=True)
        path = derived / f"{_UNSAFE.sub('_', name.strip())[:100]}-{state_id}.csv"
        fd, tmp = tempfile.mkstemp(dir=derived, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", newline="") as fh:
                frame.to_csv(fh, index=False)
            os.replace(tmp, path)
            lineage = {"derived_from": record.dataset_id, "steps": [describe_spec(s) for s in chain],
                       "root": data.root.dataset_id, "state_id": state_id}
            new = self.registry.add(name, tags, "csv", path, description, lineage=lineage)
        except BaseException:
            for leftover in (tmp, path):  # nothing half-made stays behind
                Path(leftover).unlink(missing_ok=True)
            raise
        return PreprocReply(state_id=state_id, derived=new.to_info())


def _without(request: FARequest, columns: list[str]) -> FARequest:
    """``request`` without ``columns`` (named, with their arguments and thresholds)."""
    gone = set(columns)
    return msgspec.structs.replace(
        request, columns=[c for c in request.columns if c not in gone],
        stats_args={c: a for c, a in request.stats_args.items() if c not in gone},
        thresholds={c: t for c, t in request.thresholds.items() if c not in gone})
