"""Jobs: Fed-BioMed's unit of federated work, with its names and meanings kept.

A job builds the messages for its nodes, sends them through ``Requests`` and reduces the
replies; it never touches a socket. ``Job.RequestTimer`` measures, per node, the time from
sending to that node's reply on the researcher's side.

``FARequestJob`` asks each node for partial statistics over its dataset of a
``FederatedDataset``. As in the seed: ``stats`` and ``stats_args`` are mutually exclusive
and one of them is required, ``stats_args`` cannot be combined with ``dataset_schema``,
one request goes to each node with that node's ``dataset_id``, any node error is fatal
(each node's code and message are logged and the raised ``FedlabNodeError`` names the
failing nodes), and no reply at all is an error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from fedlab.analytics.messages import STATISTICS, FAReply, FARequest, FASecure
from fedlab.errors import FedlabError, FedlabNodeError
from fedlab.protocol import ErrorReply
from fedlab.protocol.dp_messages import DPQuery
from fedlab.researcher.federated_dataset import FederatedDataset
from fedlab.researcher.policies import RequestPolicy
from fedlab.researcher.requests import FederatedRequest, MessagesByNode, MissingNode, Requests

__all__ = ["FARequestJob", "Job"]

log = logging.getLogger("fedlab.researcher")
R = TypeVar("R")


class _RequestTimer:
    """``with job.RequestTimer(nodes) as timer:`` then ``timer.stop(request)``: seconds per node."""

    def __init__(self, nodes: Iterable[str]) -> None:
        self.nodes = list(nodes)
        self.timings: dict[str, float] = {}
        self._start = 0.0

    def __enter__(self) -> _RequestTimer:
        self._start = time.perf_counter()
        return self

    def stop(self, request: FederatedRequest) -> None:
        for node_id, at in request.reply_times().items():
            self.timings[node_id] = at - request.started

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        end = time.perf_counter() - self._start
        for node_id in self.nodes:
            self.timings.setdefault(node_id, end)


class Job:
    """Base class: holds the researcher id, the request layer, the nodes and the policies."""

    RequestTimer = _RequestTimer

    def __init__(self, *, researcher_id: str, requests: Requests, nodes: Iterable[str] | None = None,
                 policies: Sequence[RequestPolicy] | None = None) -> None:
        self._researcher_id = researcher_id
        self._requests = requests
        self._nodes = list(nodes) if nodes is not None else None
        self._policies = list(policies or [])
        self.errors: dict[str, ErrorReply] = {}
        self.missing: dict[str, MissingNode] = {}
        self.timings: dict[str, float] = {}

    @property
    def researcher_id(self) -> str:
        return self._researcher_id

    @property
    def requests(self) -> Requests:
        return self._requests

    @property
    def nodes(self) -> list[str] | None:
        return self._nodes

    def execute(self) -> Any:
        raise NotImplementedError

    def _send(self, messages: MessagesByNode, reply_type: type[R], what: str) -> dict[str, R]:
        """Send one message per node, time it, keep errors and silences in ``self``, log them."""
        nodes = self.nodes or []
        with self.RequestTimer(nodes) as timer, self.requests.send(messages, nodes, self._policies) as request:
            timer.stop(request)
            replies: dict[str, R] = {
                n: e.content for n, e in request.replies().items() if isinstance(e.content, reply_type)}
            self.errors = request.errors()
            self.missing = request.missing()
        self.timings = timer.timings
        for node_id, error in self.errors.items():
            log.error("node %s failed %s: [%s] %s", node_id, what, error.code, error.message)
        for node_id, why in self.missing.items():
            log.warning("node %s did not answer %s: %s", node_id, what, why)
        return replies


class FARequestJob(Job):
    def __init__(
        self,
        experiment_id: str | None,
        fa_id: str | None,
        federated_dataset: FederatedDataset,
        stats_args: Mapping[str, Mapping[str, Mapping[str, Any]]] | None,
        stats: Sequence[str] | None,
        dataset_schema: Sequence[str] | None = None,
        *,
        researcher_id: str,
        requests: Requests,
        nodes: Iterable[str] | None = None,
        policies: Sequence[RequestPolicy] | None = None,
        crosstab: Sequence[str] = (),
        thresholds: Mapping[str, Sequence[float]] | None = None,
        table_stats: Sequence[str] = (),
        raise_on_error: bool = True,
        secagg: Mapping[str, FASecure] | None = None,
        dp: DPQuery | None = None,
    ) -> None:
        """``crosstab``, ``thresholds``, ``table_stats`` and ``raise_on_error`` go past the seed:
        the two crosstab columns, quantile-round thresholds per column, table statistics (cov,
        corr, crosstab) to add beside ``stats_args``, and whether node errors raise or are kept
        in ``.errors`` for the caller to report. ``secagg`` gives each node's part of a secure aggregation
        (``FASecure``, see :mod:`fedlab.researcher.secure_stats`). ``dp`` asks every node for a differentially
        private answer (see :mod:`fedlab.researcher.dp_stats`)."""
        super().__init__(researcher_id=researcher_id, requests=requests,
                         nodes=nodes if nodes is not None else federated_dataset.node_ids(), policies=policies)
        if not stats and not stats_args:
            raise FedlabError("FARequestJob needs either `stats` (a list of statistic names) or `stats_args` "
                              "(per-column arguments)")
        if stats and stats_args:
            raise FedlabError("`stats` and `stats_args` are mutually exclusive: give one of them")
        if stats_args and dataset_schema:
            raise FedlabError("`stats_args` already names the columns; it cannot be combined with "
                              "`dataset_schema`")
        names = list(stats or []) + [s for per_col in (stats_args or {}).values() for s in per_col]
        names += list(table_stats)
        unknown = sorted(set(names) - set(STATISTICS))
        if unknown:
            raise FedlabError(f"unknown statistics {unknown}; choose from {list(STATISTICS)}")
        self.experiment_id = experiment_id
        self.fa_id = fa_id
        self._fds = federated_dataset
        self._stats = list(dict.fromkeys(names))
        self._columns = list(stats_args) if stats_args else list(dataset_schema or [])
        self._stats_args = {c: {s: dict(a) for s, a in per.items()} for c, per in (stats_args or {}).items()}
        self._crosstab = list(crosstab)
        self._thresholds = {c: [float(t) for t in ts] for c, ts in (thresholds or {}).items()}
        self._raise_on_error = raise_on_error
        self._secagg = dict(secagg or {})
        self._dp = dp

    def _message_for(self, node_id: str) -> FARequest:
        return FARequest(dataset_id=self._fds.dataset(node_id).dataset_id, stats=self._stats,
                         columns=self._columns, stats_args=self._stats_args, crosstab=self._crosstab,
                         thresholds=self._thresholds, secagg=self._secagg.get(node_id), dp=self._dp)

    def execute(self) -> dict[str, FAReply]:
        messages = MessagesByNode({n: self._message_for(n) for n in self.nodes or []})
        replies = self._send(messages, FAReply, "the analytics request")
        if self.errors and self._raise_on_error:
            raise FedlabNodeError(
                f"analytics failed on nodes {sorted(self.errors)}: "
                + "; ".join(f"{n}: {e.message}" for n, e in self.errors.items()),
                {n: (e.code, e.message) for n, e in self.errors.items()})
        if not replies and not (self.errors and not self._raise_on_error):
            silent = "; ".join(f"{n}: {m}" for n, m in self.missing.items()) or "no node was asked"
            raise FedlabNodeError(f"no node answered the analytics request ({silent})")
        return replies
