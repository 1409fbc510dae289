"""Federated preprocessing: PreprocRequestJob (the seed's job) and the researcher's pipeline.

Each step is fitted on the nodes' data as transformed by the steps before it: the nodes send
partial statistics of their transformed data, the researcher merges them into the step's
global parameters (the same ones a fit on the pooled rows would give), and sends them back
for the nodes to add the step to their chain. ``apply`` writes the result on every node as a
new dataset with its lineage; the source stays as it was. A node that fails a step is
dropped from the pipeline, and the pipeline says which and why.

    derived = (researcher.preprocess(fds)
               .impute(["bmi"], strategy="median")
               .standardize(["age", "bmi"])
               .apply(name="diabetes-clean", tags=["diabetes-clean"]))
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from fedlab.analytics.merge import merge_categorical, merge_numeric
from fedlab.analytics.quantiles import QuantileSearch
from fedlab.errors import FedlabError
from fedlab.preprocessing.fit import (
    combat_global_params,
    impute_params,
    minmax_params,
    onehot_params,
    standardize_params,
)
from fedlab.preprocessing.messages import PREPROC_STEPS, PREPROC_TYPES, PreprocReply, PreprocRequest
from fedlab.protocol import DatasetInfo
from fedlab.researcher.federated_dataset import FederatedDataset
from fedlab.researcher.jobs import Job
from fedlab.researcher.policies import DiscardOnTimeout, RequestPolicy
from fedlab.researcher.requests import MessagesByNode, Requests

__all__ = ["Pipeline", "PreprocRequestJob"]


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

    def _set(self, preproc_type: str, spec: dict[str, Any]) -> Pipeline:
        self._run(preproc_type, "set", {"transform": spec})
        self.steps.append(spec)
        return self

    @staticmethod
    def _check_refusals(replies: Mapping[str, PreprocReply], columns: Sequence[str], what: str) -> None:
        for node_id, reply in replies.items():
            refused = {k: v for k, v in (reply.partials.refused if reply.partials else {}).items()
                       if k.split(".")[0] in columns and not k.endswith("min/max")}
            if refused:
                raise FedlabError(f"{what} cannot be fitted: node {node_id} withheld "
                                  + "; ".join(f"{k}: {v}" for k, v in refused.items()))

    def _numeric(self, replies: Mapping[str, PreprocReply], column: str) -> Any:
        return merge_numeric({n: r.partials.numeric[column] for n, r in replies.items()
                              if r.partials is not None and column in r.partials.numeric})

    # -- steps -------------------------------------------------------------------------------
    def standardize(self, columns: Sequence[str]) -> Pipeline:
        """(x - mean) / std with the federated mean and population std (as scikit-learn's StandardScaler)."""
        replies = self._fit("standardize", columns, ["count", "mean", "var"])
        self._check_refusals(replies, columns, "standardize")
        return self._set("standardize", standardize_params({c: self._numeric(replies, c) for c in columns}))

    def minmax(self, columns: Sequence[str]) -> Pipeline:
        """(x - min) / (max - min); needs nodes that release exact min and max."""
        replies = self._fit("minmax", columns, ["min", "max"])
        withheld = [self._names.get(n, n) for n, r in replies.items()
                    if r.partials is None or any(r.partials.numeric.get(c) is None
                                                 or r.partials.numeric[c].min is None for c in columns)]
        merged = {c: self._numeric(replies, c) for c in columns}
        return self._set("minmax", minmax_params(merged, withheld=withheld))

    def impute(self, columns: Sequence[str], strategy: str = "mean") -> Pipeline:
        """Fill missing values with the federated mean, median or most frequent value."""
        if strategy not in ("mean", "median", "most_frequent"):
            raise FedlabError(f"impute strategy must be mean, median or most_frequent, not {strategy!r}")
        if strategy == "most_frequent":
            replies = self._fit("impute", columns, [], {c: {"value_counts": {}} for c in columns})
            categorical = {c: merge_categorical({n: r.partials.categorical[c] for n, r in replies.items()
                                                 if r.partials is not None and c in r.partials.categorical})
                           for c in columns}
            return self._set("impute", impute_params(strategy, {}, categorical, None))
        replies = self._fit("impute", columns, ["count", "mean", "var"])
        self._check_refusals(replies, columns, "impute")
        numeric = {c: self._numeric(replies, c) for c in columns}
        medians = self._medians(numeric) if strategy == "median" else None
        return self._set("impute", impute_params(strategy, numeric, {}, medians))

    def _medians(self, numeric: Mapping[str, Any]) -> dict[str, float]:
        # imputed values become data: find the median to float precision, not just to 1e-6 of the range
        searches = {c: QuantileSearch.from_moments([0.5], m.count, m.mean, m.std, rel_tol=1e-13)
                    for c, m in numeric.items()}
        for _ in range(60):
            thresholds = {c: t for c, s in searches.items() if (t := s.next_thresholds())}
            if not thresholds:
                break
            replies = self._run("impute", "fit", {"columns": list(thresholds), "stats": ["quantiles"],
                                                  "thresholds": thresholds})
            for column, ts in thresholds.items():
                counts = [0] * len(ts)
                for reply in replies.values():
                    partial = reply.partials.numeric.get(column) if reply.partials else None
                    below = partial.below if partial is not None and partial.below is not None else [0] * len(ts)
                    counts = [a + b for a, b in zip(counts, below, strict=True)]
                searches[column].update(counts)
        return {c: s.result()[0.5] for c, s in searches.items()}

    def onehot(self, columns: Sequence[str]) -> Pipeline:
        """One 0/1 column per category of the union across nodes; suppressed ones go to <other>."""
        replies = self._fit("onehot", columns, [], {c: {"value_counts": {}} for c in columns})
        categorical = {c: merge_categorical({n: r.partials.categorical[c] for n, r in replies.items()
                                             if r.partials is not None and c in r.partials.categorical})
                       for c in columns}
        return self._set("onehot", onehot_params(categorical))

    def combat(self, columns: Sequence[str]) -> Pipeline:
        """ComBat harmonisation of the site effect (location and scale, empirical Bayes), each node a batch."""
        replies = self._fit("combat", columns, ["count", "mean", "var"])
        self._check_refusals(replies, columns, "combat")
        moments = {n: {c: (p.count, p.mean, p.m2) for c in columns if (p := r.partials.numeric.get(c)) is not None}
                   for n, r in replies.items() if r.partials is not None}
        spec = combat_global_params(moments)
        return self._set("combat", {"type": "combat", "columns": list(columns), **spec})

    def apply(self, *, name: str, tags: Sequence[str], description: str = "") -> FederatedDataset:
        """Write the transformed data as a new dataset on every node; return them as a FederatedDataset."""
        if not self.steps:
            raise FedlabError("the pipeline has no steps yet: add one (standardize, impute, ...) before apply")
        replies = self._run(self.steps[-1]["type"], "apply",
                            {"name": name, "tags": list(tags), "description": description})
        derived: dict[str, DatasetInfo] = {n: r.derived for n, r in replies.items() if r.derived is not None}
        return FederatedDataset(derived, node_names=self._names, missing=dict(self.dropped))

    def __repr__(self) -> str:
        steps = ", ".join(s["type"] for s in self.steps) or "no steps yet"
        dropped = f"; dropped: {self._why_dropped()}" if self.dropped else ""
        return f"Pipeline({self.preproc_id}: {steps} on {len(self.nodes)} nodes{dropped})"
