"""Federated preprocessing: PreprocRequestJob (named after Fed-BioMed's job) and the researcher's pipeline.

Each step is fitted on the nodes' data as transformed by the steps before it: the nodes send
partial statistics of their transformed data, the researcher merges them into the step's
global parameters (the same ones a fit on the pooled rows would give), and sends them back
for the nodes to add the step to their chain. ``apply`` writes the result on every node as a
new dataset with its lineage; the source stays as it was. A node that fails a step is
dropped from the pipeline, and the pipeline says which and why. A node that holds no value of
a column (a lab value it never measured) stays in: the step is fitted on the nodes that have
values and applied on every node, and the pipeline names the node in ``not_contributing``, in its
notes, in the derived ``FederatedDataset.notes`` and in a :class:`DataQualityWarning`
(see :mod:`fedlab.preprocessing.contributions`).

    derived = (researcher.preprocess(fds)
               .impute(["bmi"], strategy="median")
               .standardize(["age", "bmi"])
               .apply(name="diabetes-clean", tags=["diabetes-clean"]))
"""

from __future__ import annotations

import copy
import math
import numbers
import uuid
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from fedlab.analytics.merge import MergedNumeric, merge_categorical, merge_numeric
from fedlab.analytics.messages import NumericPartial
from fedlab.analytics.quantiles import NodeAnswer, QuantileSearch
from fedlab.errors import FedlabError
from fedlab.preprocessing.contributions import (
    NotContributing,
    categorical_partials,
    no_values_by_column,
    numeric_partials,
)
from fedlab.preprocessing.fit import (
    combat_global_params,
    impute_params,
    minmax_params,
    onehot_params,
    standardize_params,
)
from fedlab.preprocessing.messages import PREPROC_STEPS, PREPROC_TYPES, PreprocReply, PreprocRequest
from fedlab.protocol import DatasetInfo
from fedlab.researcher.federated_dataset import DataQualityWarning, FederatedDataset
from fedlab.researcher.jobs import Job
from fedlab.researcher.policies import DiscardOnTimeout, RequestPolicy
from fedlab.researcher.requests import MessagesByNode, Requests

__all__ = ["Pipeline", "PreprocRequestJob"]

_PROBE = -1.7976931348623157e308  # a threshold below every value: a node answers 0, no value revealed


class PreprocRequestJob(Job):
    """One preprocessing step on every node; node errors are logged and reported, not fatal."""

    def __init__(
        self,
        experiment_id: str | None,
        preproc_type: str,
        preproc_step: str,
        preproc_id: str,
        federated_dataset: FederatedDataset,
        preproc_args: Mapping[str, Any],
        state_id: Mapping[str, str | None] | None = None,
        *,
        researcher_id: str,
        requests: Requests,
        nodes: Sequence[str] | None = None,
        policies: Sequence[RequestPolicy] | None = None,
    ) -> None:
        super().__init__(researcher_id=researcher_id, requests=requests,
                         nodes=nodes if nodes is not None else federated_dataset.node_ids(), policies=policies)
        if preproc_type not in PREPROC_TYPES:
            raise FedlabError(f"unknown preprocessing type {preproc_type!r}; choose from {list(PREPROC_TYPES)}")
        if preproc_step not in PREPROC_STEPS:
            raise FedlabError(f"unknown preprocessing step {preproc_step!r}; choose from {list(PREPROC_STEPS)}")
        self.experiment_id = experiment_id
        self._type, self._step, self._id = preproc_type, preproc_step, preproc_id
        self._fds = federated_dataset
        self._args = dict(preproc_args)
        self._states = dict(state_id or {})

    def execute(self) -> dict[str, PreprocReply]:
        nodes = self.nodes or []
        messages = MessagesByNode({
            n: PreprocRequest(dataset_id=self._fds.dataset(n).dataset_id, preproc_type=self._type,
                              preproc_step=self._step, preproc_id=self._id,
                              preproc_args=copy.deepcopy(self._args),  # no node sees another's mutations
                              state_id=self._states.get(n))
            for n in nodes})
        return self._send(messages, PreprocReply, f"preprocessing {self._type}/{self._step}")


class Pipeline:
    """Steps fitted federatedly, one after another; ``apply`` makes the derived datasets."""

    def __init__(self, fds: FederatedDataset, *, researcher_id: str, requests: Requests,
                 node_names: Mapping[str, str] | None = None, timeout: float = 60.0) -> None:
        self.fds = fds
        self.preproc_id = "preproc-" + uuid.uuid4().hex[:12]
        self._researcher_id = researcher_id
        self._requests = requests
        self._names = dict(node_names or {})
        self._policies = [DiscardOnTimeout(timeout)]
        self.states: dict[str, str | None] = {n: None for n in fds.node_ids()}
        self.steps: list[dict[str, Any]] = []
        self.dropped: dict[str, str] = {}
        self.notes: list[str] = []  # what the reader must know about a fitted step (an approximate median)
        self.not_contributing: list[NotContributing] = []  # columns some nodes hold no value of, per step

    # -- plumbing ----------------------------------------------------------------------------
    @property
    def nodes(self) -> list[str]:
        return [n for n in self.states if n not in self.dropped]

    def _run(self, preproc_type: str, step: str, args: Mapping[str, Any]) -> dict[str, PreprocReply]:
        if not self.nodes:
            raise FedlabError("no node is left in this preprocessing pipeline: " + self._why_dropped())
        job = PreprocRequestJob(None, preproc_type, step, self.preproc_id, self.fds, args, self.states,
                                researcher_id=self._researcher_id, requests=self._requests, nodes=self.nodes,
                                policies=self._policies)
        replies = job.execute()
        for node_id, error in job.errors.items():
            self.dropped[node_id] = f"{preproc_type}/{step}: [{error.code}] {error.message}"
        for node_id, why in job.missing.items():
            self.dropped[node_id] = f"{preproc_type}/{step}: {why}"
        for node_id, reply in replies.items():
            self.states[node_id] = reply.state_id
        if not replies:
            raise FedlabError(f"every node failed {preproc_type}/{step}: " + self._why_dropped())
        return replies

    def _why_dropped(self) -> str:
        return "; ".join(f"{self._names.get(n, n)}: {why}" for n, why in self.dropped.items()) or "no nodes"

    def _fit(self, preproc_type: str, columns: Sequence[str], stats: Sequence[str],
             stats_args: Mapping[str, Any] | None = None) -> dict[str, PreprocReply]:
        return self._run(preproc_type, "fit", {"columns": list(columns), "stats": list(stats),
                                               "stats_args": dict(stats_args or {})})

    def _set(self, preproc_type: str, spec: dict[str, Any],
             empty: Mapping[str, Sequence[str]] | None = None) -> Pipeline:
        """Send the fitted ``spec``; ``empty``: per column, the nodes it was fitted without."""
        self._run(preproc_type, "set", {"transform": spec})
        self.steps.append(spec)
        for column, nodes in (empty or {}).items():
            kept = tuple(n for n in nodes if n not in self.dropped)
            if not kept:
                continue
            record = NotContributing(len(self.steps) - 1, preproc_type, column, kept)
            self.not_contributing.append(record)
            self.notes.append(record.describe(self._names))
            warnings.warn(record.describe(self._names), DataQualityWarning, stacklevel=3)
        return self

    def _no_values(self, preproc_type: str, replies: Mapping[str, PreprocReply],
                   columns: Sequence[str]) -> dict[str, tuple[str, ...]]:
        return no_values_by_column(replies, columns, preproc_type, self._names)

    @staticmethod
    def _check_refusals(replies: Mapping[str, PreprocReply], columns: Sequence[str], what: str,
                        ignore: Sequence[str] = ()) -> None:
        """Raise if a node withheld anything of ``columns`` (but min/max, or keys ending in ``ignore``)."""
        for node_id, reply in replies.items():
            refused = {k: v for k, v in (reply.partials.refused if reply.partials else {}).items()
                       if k.split(".")[0] in columns and not k.endswith(("min/max", *ignore))}
            if refused:
                raise FedlabError(f"{what} cannot be fitted: node {node_id} withheld "
                                  + "; ".join(f"{k}: {v}" for k, v in refused.items()))

    @staticmethod
    def _numeric(replies: Mapping[str, PreprocReply], column: str) -> MergedNumeric:
        return merge_numeric(numeric_partials(replies, column))

    # -- steps -------------------------------------------------------------------------------
    def standardize(self, columns: Sequence[str]) -> Pipeline:
        """(x - mean) / std with the federated mean and population std (as scikit-learn's StandardScaler)."""
        replies = self._fit("standardize", columns, ["count", "mean", "var"])
        self._check_refusals(replies, columns, "standardize")
        empty = self._no_values("standardize", replies, columns)
        return self._set("standardize", standardize_params({c: self._numeric(replies, c) for c in columns}), empty)

    def minmax(self, columns: Sequence[str]) -> Pipeline:
        """(x - min) / (max - min); needs nodes that release exact min and max."""
        replies = self._fit("minmax", columns, ["min", "max"])
        empty = self._no_values("minmax", replies, columns)
        withheld = [self._names.get(n, n) for n, r in replies.items()
                    if r.partials is None or any(c not in (r.no_values or ()) and (r.partials.numeric.get(c) is None
                                                 or r.partials.numeric[c].min is None) for c in columns)]
        merged = {c: self._numeric(replies, c) for c in columns}
        return self._set("minmax", minmax_params(merged, withheld=withheld), empty)

    def impute(self, columns: Sequence[str], strategy: str = "mean", fill_value: Any = None) -> Pipeline:
        """Fill missing values with the federated mean, median or most frequent value, or with
        ``fill_value`` (``strategy="constant"``, which needs no fit)."""
        if strategy not in ("mean", "median", "most_frequent", "constant"):
            raise FedlabError(f"impute strategy must be mean, median, most_frequent or constant, not {strategy!r}")
        if strategy == "constant":
            return self._set("impute", {"type": "impute", "columns": list(columns),
                                        "values": dict.fromkeys(columns, _fill_value(fill_value))})
        if fill_value is not None:
            raise FedlabError(f'fill_value is for strategy="constant"; the {strategy} strategy fits its value')
        if strategy == "most_frequent":
            replies = self._fit("impute", columns, [], {c: {"value_counts": {}} for c in columns})
            empty = self._no_values("impute", replies, columns)
            categorical = {c: merge_categorical(categorical_partials(replies, c)) for c in columns}
            return self._set("impute", impute_params(strategy, {}, categorical, None), empty)
        if strategy == "median":
            # the median's level and one threshold below every value (it reveals none) come along, so
            # that each node says now whether it answers median thresholds, and to which grid it rounds them
            args = {c: {"count": {}, "mean": {}, "var": {}, "quantiles": {"levels": [0.5]}} for c in columns}
            replies = self._run("impute", "fit", {"columns": list(columns), "stats": ["count", "mean", "var"],
                                                  "stats_args": args, "thresholds": {c: [_PROBE] for c in columns}})
            self._check_refusals(replies, columns, "impute", ignore=(".thresholds",))  # the probe's, if withheld
        else:
            replies = self._fit("impute", columns, ["count", "mean", "var"])
            self._check_refusals(replies, columns, "impute")
        empty = self._no_values("impute", replies, columns)
        numeric = {c: self._numeric(replies, c) for c in columns}
        medians = self._medians(replies, columns) if strategy == "median" else None
        return self._set("impute", impute_params(strategy, numeric, {}, medians), empty)

    def _medians(self, first: Mapping[str, PreprocReply], columns: Sequence[str]) -> dict[str, float]:
        """The federated median of each column, by the quantile search over the nodes still in the
        pipeline (``first``: their replies to the fit, with their moments and threshold grids)."""
        partials = {c: numeric_partials(first, c) for c in columns}
        searches: dict[str, QuantileSearch] = {}
        for c in columns:
            search = self._median_search(partials[c])
            if search is None:
                raise FedlabError(f"median imputation of {c!r}: no node holds a value of it")
            searches[c] = search
        for _ in range(60 * (len(self.states) + 1)):  # each search stops by itself; a restart starts afresh
            thresholds = {c: t for c, s in searches.items() if (t := s.next_thresholds())}
            if not thresholds:
                break
            args = {c: {"quantiles": {"levels": [0.5]}} for c in thresholds}
            replies = self._run("impute", "fit", {"columns": list(thresholds), "stats": ["quantiles"],
                                                  "stats_args": args, "thresholds": thresholds})
            for column, ts in thresholds.items():
                answers: dict[str, NodeAnswer] = {}  # per node: its counts (None: withheld), grid, n
                gone = []
                for node_id, first_partial in partials[column].items():
                    reply = replies.get(node_id)
                    partial = reply.partials.numeric.get(column) if reply is not None and reply.partials else None
                    if partial is None or partial.below is None or len(partial.below) != len(ts):
                        gone.append(node_id)  # dropped, or refused: the others' counts no longer add up
                    else:
                        answers[node_id] = NodeAnswer(partial.below, partial.resolution, first_partial.count,
                                                      partial.below_at)
                if gone:
                    why = "; ".join(f"{self._names.get(n, n)}: " + self._refusal(replies.get(n), column)
                                    for n in gone)
                    self.notes.append(f"median of {column!r}: started again without {why}")
                    partials[column] = {n: p for n, p in partials[column].items() if n not in gone}
                    search = self._median_search(partials[column])
                    if search is None:
                        raise FedlabError(f"median imputation of {column!r}: no node answered its median search "
                                          f"({why})")
                    searches[column] = search
                    continue
                searches[column].update_nodes(answers)
                searches[column].set_resolution(max((a.resolution for a in answers.values() if a.resolution),
                                                    default=None))
        medians = {}
        for column, search in searches.items():
            value, half = search.result_with_bounds()[0.5]
            if value != value:
                raise FedlabError(f"median imputation of {column!r}: the nodes withheld the counts that would "
                                  "locate the median (too few values on one side of it on some node, or this "
                                  "researcher's threshold allowance spent); impute with the mean instead")
            if half > 0:
                self.notes.append(f"median of {column!r} = {value:.6g}, within ± {half:.3g} of the pooled median "
                                  "(the nodes round thresholds to a grid" + (
                                      ", and withheld some counts)" if search.approximate else ")"))
            medians[column] = value
        return medians

    @staticmethod
    def _median_search(partials: Mapping[str, NumericPartial]) -> QuantileSearch | None:
        if not partials:
            return None
        m = merge_numeric({n: msgspec.structs.replace(p, below=None) for n, p in partials.items()})
        if m.count == 0:
            return None
        steps = [p.resolution for p in partials.values() if p.resolution]
        # imputed values become data: find the median to float precision (or the nodes' grid)
        return QuantileSearch.from_moments([0.5], m.count, m.mean, m.std, rel_tol=1e-13,
                                           resolution=max(steps, default=None))

    @staticmethod
    def _refusal(reply: PreprocReply | None, column: str) -> str:
        if reply is None:
            return "it left the pipeline"
        refused = reply.partials.refused if reply.partials is not None else {}
        return refused.get(f"{column}.quantiles") or refused.get(column) or "it sent no counts"

    def onehot(self, columns: Sequence[str]) -> Pipeline:
        """One 0/1 column per category of the union across nodes; suppressed ones go to <other>."""
        replies = self._fit("onehot", columns, [], {c: {"value_counts": {}} for c in columns})
        empty = self._no_values("onehot", replies, columns)
        categorical = {c: merge_categorical(categorical_partials(replies, c)) for c in columns}
        return self._set("onehot", onehot_params(categorical), empty)

    def combat(self, columns: Sequence[str]) -> Pipeline:
        """ComBat harmonisation of the site effect (location and scale, empirical Bayes), each node a batch."""
        replies = self._fit("combat", columns, ["count", "mean", "var"])
        self._check_refusals(replies, columns, "combat")
        empty = self._no_values("combat", replies, columns)
        moments: dict[str, dict[str, tuple[int, float, float]]] = {n: {} for n in replies}
        for c in columns:
            for n, p in numeric_partials(replies, c).items():
                moments[n][c] = (p.count, p.mean, p.m2)
        spec = combat_global_params(moments)
        return self._set("combat", {"type": "combat", "columns": list(columns), **spec}, empty)

    def apply(self, *, name: str, tags: Sequence[str], description: str = "") -> FederatedDataset:
        """Write the transformed data as a new dataset on every node; return them as a FederatedDataset."""
        if not self.steps:
            raise FedlabError("the pipeline has no steps yet: add one (standardize, impute, ...) before apply")
        replies = self._run(self.steps[-1]["type"], "apply",
                            {"name": name, "tags": list(tags), "description": description})
        derived: dict[str, DatasetInfo] = {n: r.derived for n, r in replies.items() if r.derived is not None}
        return FederatedDataset(derived, node_names=self._names, missing=dict(self.dropped), notes=self.notes)

    def __repr__(self) -> str:
        steps = ", ".join(s["type"] for s in self.steps) or "no steps yet"
        dropped = f"; dropped: {self._why_dropped()}" if self.dropped else ""
        notes = f"; {'; '.join(self.notes)}" if self.notes else ""
        return f"Pipeline({self.preproc_id}: {steps} on {len(self.nodes)} nodes{dropped}{notes})"


def _fill_value(value: Any) -> str | int | float | bool:
    """A constant to impute: a number, a string or a bool, never missing itself."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(float(value)):
        return float(value)
    raise FedlabError('impute(strategy="constant") needs fill_value, a finite number, a string or a bool; '
                      f"got {value!r}")
