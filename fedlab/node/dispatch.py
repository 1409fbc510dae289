"""The node's dispatch table: message type -> handler, and the rule "exactly one reply".

A handler takes the request envelope and returns reply content (optionally with buffers).
Whatever happens (an unknown type, a FedlabError, a bug) the caller gets exactly one reply
envelope back, addressed to the request's msg_id, and the node keeps serving. Dataset paths
on the node's disk never appear in a reply: registry records go out as ``DatasetInfo``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from fedlab.analytics.disclosure import DisclosureRules
from fedlab.analytics.messages import FARequest
from fedlab.errors import (
    FedlabApprovalError,
    FedlabConfigError,
    FedlabDatasetError,
    FedlabDisclosureError,
    FedlabError,
    FedlabProtocolError,
    FedlabRequestStopped,
    FedlabTrainingError,
)
from fedlab.node.analytics_handler import AnalyticsHandler
from fedlab.node.preproc_handler import PreprocHandler
from fedlab.node.registry import DatasetRegistry
from fedlab.node.training_handler import DEFAULT_TIMEOUT, Emit, TrainingHandler
from fedlab.preprocessing.messages import PreprocRequest
from fedlab.protocol import (
    DatasetListReply,
    DatasetSearchReply,
    DatasetSearchRequest,
    Envelope,
    ErrorReply,
    Message,
    PingReply,
    PingRequest,
    make_envelope,
)

__all__ = ["Dispatcher", "HandlerResult", "error_code"]

log = logging.getLogger("fedlab.node")
HandlerResult = Message | tuple[Message, Sequence[bytes | memoryview]]
Handler = Callable[[Envelope], HandlerResult]

_CODES: list[tuple[type[FedlabError], str]] = [
    (FedlabDatasetError, "dataset_error"),
    (FedlabApprovalError, "not_approved"),
    (FedlabDisclosureError, "disclosure_refused"),
    (FedlabConfigError, "config_error"),
    (FedlabProtocolError, "invalid_request"),
    (FedlabTrainingError, "plan_error"),
    (FedlabRequestStopped, "cancelled"),
]


def error_code(exc: FedlabError) -> str:
    if isinstance(exc, FedlabProtocolError):
        return exc.code
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return "node_error"


class Dispatcher:
    def __init__(self, node_id: str, name: str, registry: DatasetRegistry,
                 rules: DisclosureRules | None = None, node_dir: Path | None = None, *,
                 require_approval: bool = True, training_threads: int = 0,
                 training_timeout: float = DEFAULT_TIMEOUT, emit: Emit | None = None) -> None:
        self.node_id = node_id
        self.name = name
        self.registry = registry
        rules = rules or DisclosureRules()
        self.analytics = AnalyticsHandler(registry, rules, node_id=node_id)
        # Preprocessing writes derived datasets into the node's directory, so it needs one.
        self.preproc = None if node_dir is None else PreprocHandler(
            registry, rules, node_id=node_id, node_dir=node_dir, analytics=self.analytics)
        # ``emit`` sends progress events while a training request runs (the node's transport).
        self.training = TrainingHandler(registry, node_id=node_id, name=name,
                                        require_approval=require_approval, threads=training_threads,
                                        timeout=training_timeout, emit=emit)
        self.table: dict[str, Handler] = {
            "ping_request": self._ping,
            "dataset_search_request": self._search,
            "dataset_list_request": self._list,
            "fa_request": self._analytics,
            "preproc_request": self._preprocess,
            "training_plan_approve_request": self.training.approve_request,
            "training_plan_status_request": self.training.status_request,
            "train_request": self.training.train_request,
            "train_cancel_request": self.training.cancel_request,
        }

    def handle(self, envelope: Envelope) -> Envelope:
        """Run the handler for ``envelope`` and return its one reply (an error reply on failure)."""
        buffers: Sequence[bytes | memoryview] = ()
        handler = self.table.get(envelope.msg_type)
        if handler is None:
            content: Message = ErrorReply(
                code="unknown_type",
                message=f"node {self.name} does not handle {envelope.msg_type!r} messages "
                        f"(it handles {sorted(self.table)})",
                node=self.node_id,
            )
        else:
            try:
                result = handler(envelope)
                content, buffers = result if isinstance(result, tuple) else (result, ())
            except FedlabError as exc:
                log.warning("%s from %s refused: %s", envelope.msg_type, envelope.sender, exc)
                content = ErrorReply(code=error_code(exc), message=str(exc), node=self.node_id)
            except Exception as exc:
                log.exception("handler for %s failed", envelope.msg_type)
                content = ErrorReply(
                    code="internal_error",
                    message=f"node {self.name} failed on {envelope.msg_type}: {type(exc).__name__}: {exc}",
                    node=self.node_id,
                )
        return make_envelope(content, self.node_id, parent_id=envelope.msg_id, buffers=buffers)

    # -- handlers --------------------------------------------------------------------------
    def _ping(self, envelope: Envelope) -> HandlerResult:
        assert isinstance(envelope.content, PingRequest)
        echoed = tuple(envelope.buffers) if envelope.content.echo_buffers else ()
        return PingReply(node_name=self.name, n_buffers=len(echoed)), echoed

    def _search(self, envelope: Envelope) -> HandlerResult:
        assert isinstance(envelope.content, DatasetSearchRequest)
        return DatasetSearchReply(datasets=[r.to_info() for r in self.registry.search(envelope.content.tags)])

    def _analytics(self, envelope: Envelope) -> HandlerResult:
        assert isinstance(envelope.content, FARequest)
        return self.analytics(envelope.content)

    def _preprocess(self, envelope: Envelope) -> HandlerResult:
        assert isinstance(envelope.content, PreprocRequest)
        if self.preproc is None:
            raise FedlabConfigError(
                f"node {self.name} was started without a node directory, so it cannot write derived "
                "datasets; start it with `fedlab node start DIR` to use preprocessing")
        return self.preproc(envelope.content)

    def _list(self, envelope: Envelope) -> HandlerResult:
        return DatasetListReply(datasets=[r.to_info() for r in self.registry.list()])
