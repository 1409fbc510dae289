"""The node's dispatch table: message type -> handler, and the rule "exactly one reply".

A handler takes the request envelope and returns reply content (optionally with buffers).
Whatever happens (an unknown type, a FedlabError, a bug) the caller gets exactly one reply
envelope back, addressed to the request's msg_id, and the node keeps serving. Dataset paths
on the node's disk never appear in a reply: registry records go out as ``DatasetInfo``, a
FedlabError's message has the node's directory and its datasets' paths redacted
(:func:`fedlab.node.safe_errors.redact`), and a bug's exception text stays in the node's log:
the reply only names a reference under which the operator finds the traceback there.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from fedlab.analytics.disclosure import DisclosureRules
from fedlab.analytics.messages import FARequest
from fedlab.errors import (
    FedlabApprovalError,
    FedlabBudgetError,
    FedlabConfigError,
    FedlabDatasetError,
    FedlabDisclosureError,
    FedlabError,
    FedlabProtocolError,
    FedlabRequestStopped,
    FedlabSecaggError,
    FedlabTrainingError,
)
from fedlab.node.analytics_handler import INSECURE_PEER, AnalyticsHandler
from fedlab.node.dp_analytics import answer_dp
from fedlab.node.dp_ledger import DPLedger, root_record, source_key
from fedlab.node.preproc_handler import PreprocHandler
from fedlab.node.registry import DatasetRegistry
from fedlab.node.safe_errors import new_reference, path_forms, redact
from fedlab.node.secagg_handler import SecaggHandler
from fedlab.node.secagg_state import SecaggStore
from fedlab.node.secure_analytics import answer_secure
from fedlab.node.training_handler import DEFAULT_TIMEOUT, Emit, TrainingHandler
from fedlab.preprocessing.messages import PreprocRequest
from fedlab.privacy.dp_rules import DPRules
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
from fedlab.protocol.dp_messages import PrivacyBudgetReply, PrivacyBudgetRequest

__all__ = ["Dispatcher", "HandlerResult", "error_code"]

log = logging.getLogger("fedlab.node")
HandlerResult = Message | tuple[Message, Sequence[bytes | memoryview]]
Handler = Callable[[Envelope], HandlerResult]

# an absolute path (POSIX or Windows) left in a message after redaction
_ABSOLUTE = re.compile(r"(?<![\w.:/])/[^\s/'\"]+/|\b[A-Za-z]:\\")
_CODES: list[tuple[type[FedlabError], str]] = [
    (FedlabDatasetError, "dataset_error"),
    (FedlabApprovalError, "not_approved"),
    (FedlabBudgetError, "budget_exhausted"),
    (FedlabDisclosureError, "disclosure_refused"),
    (FedlabConfigError, "config_error"),
    (FedlabProtocolError, "invalid_request"),
    (FedlabTrainingError, "plan_error"),
    (FedlabRequestStopped, "cancelled"),
    (FedlabSecaggError, "secagg_refused"),
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
                 training_timeout: float = DEFAULT_TIMEOUT, emit: Emit | None = None,
                 peer: str = INSECURE_PEER, secure_aggregation: bool = True,
                 force_secure_aggregation: bool = False, secure_aggregation_min_nodes: int = 2,
                 privacy: DPRules | None = None) -> None:
        self.node_id = node_id
        self.name = name
        self.registry = registry
        self.node_dir = node_dir
        self._paths_lock = threading.Lock()
        self._paths: frozenset[str] | None = None  # path spellings to redact; None until first needed
        rules = rules or DisclosureRules()
        # ``peer``: who may ask (the researcher's key; one shared identity on an insecure node), for
        # the state that protects the data across requests (see fedlab.node.privacy_state)
        self.analytics = AnalyticsHandler(registry, rules, node_id=node_id, peer=peer)
        # Preprocessing writes derived datasets into the node's directory, so it needs one.
        self.preproc = None if node_dir is None else PreprocHandler(
            registry, rules, node_id=node_id, node_dir=node_dir, analytics=self.analytics)
        # ``emit`` sends progress events while a training request runs (the node's transport).
        self.training = TrainingHandler(registry, node_id=node_id, name=name,
                                        require_approval=require_approval, threads=training_threads,
                                        timeout=training_timeout, emit=emit)
        # Secure aggregation: its sessions live in node.db beside the registry's tables.
        self.secagg = SecaggHandler(SecaggStore(registry.db_path), node_id=node_id, name=name, peer=peer,
                                    enabled=secure_aggregation, forced=force_secure_aggregation,
                                    min_nodes=secure_aggregation_min_nodes)
        self.training.secagg = self.secagg
        # Differential privacy: the operator's [privacy] rules and the ledger of what each researcher
        # spent, in node.db (fedlab.node.dp_ledger); analytics and training spend from one budget.
        self.privacy = privacy or DPRules()
        self.dp_ledger = DPLedger(registry.db_path, self.privacy)
        self.analytics.dp_rules = self.privacy
        self.peer = peer or INSECURE_PEER
        self.training.privacy, self.training.dp_ledger, self.training.peer = self.privacy, self.dp_ledger, self.peer
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
            "result_fetch_request": self.training.held.fetch,
            "result_release_request": self.training.held.release,
            "secagg_keys_request": self.secagg.keys_request,
            "secagg_share_request": self.secagg.share_request,
            "secagg_unmask_request": self.secagg.unmask_request,
            "privacy_budget_request": self._budget,
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
                content = ErrorReply(code=error_code(exc), message=self.safe_message(str(exc)),
                                     node=self.node_id)
            except Exception:
                ref = new_reference()
                log.exception("handler for %s from %s failed (reference %s)", envelope.msg_type,
                              envelope.sender, ref)
                content = ErrorReply(
                    code="internal_error",
                    message=f"node {self.name} could not answer this {envelope.msg_type} request (internal "
                            f"error, reference {ref}); the node's operator finds the details in node.log "
                            "under that reference",
                    node=self.node_id,
                )
        return make_envelope(content, self.node_id, parent_id=envelope.msg_id, buffers=buffers)

    def safe_message(self, message: str) -> str:
        """``message`` with the node's directory and every registered dataset's path redacted.

        The paths are cached; they are read again when the redacted message still holds an
        absolute path (a dataset registered since, say). Never raises: a registry that cannot
        be read leaves the paths known so far (and the node's directory) to redact.
        """
        try:
            with self._paths_lock:
                if self._paths is None:
                    self._paths = self._read_paths()
                paths = self._paths
            redacted = redact(message, paths)
            if _ABSOLUTE.search(redacted):
                with self._paths_lock:
                    self._paths = self._read_paths(paths)
                    paths = self._paths
                redacted = redact(message, paths)
            return redacted
        except Exception:  # pragma: no cover - a message must go out whatever happens here
            log.exception("could not redact an error message; sending a generic one")
            return f"node {self.name} refused this request; its operator finds the reason in node.log"

    def _read_paths(self, known: frozenset[str] = frozenset()) -> frozenset[str]:
        paths: set[str] = set(known)
        dataset_paths: list[str] = []
        try:
            dataset_paths = [record.path for record in self.registry.list()]
        except Exception as exc:  # the reply still goes out, redacting what is known
            log.warning("could not read the dataset registry to redact an error message: %s", exc)
        db_path = getattr(self.registry, "db_path", None)
        paths |= path_forms([self.node_dir, db_path.parent if db_path is not None else None, *dataset_paths])
        return frozenset(paths)

    # -- handlers --------------------------------------------------------------------------
    def _ping(self, envelope: Envelope) -> HandlerResult:
        assert isinstance(envelope.content, PingRequest)
        echoed = tuple(envelope.buffers) if envelope.content.echo_buffers else ()
        return PingReply(node_name=self.name, n_buffers=len(echoed)), echoed

    def _search(self, envelope: Envelope) -> HandlerResult:
        assert isinstance(envelope.content, DatasetSearchRequest)
        return DatasetSearchReply(datasets=[r.to_info() for r in self.registry.search(envelope.content.tags)])

    def _analytics(self, envelope: Envelope) -> HandlerResult:
        request = envelope.content
        assert isinstance(request, FARequest)
        if request.dp is not None:
            if request.secagg is not None:
                raise FedlabDisclosureError(
                    "a request cannot ask for both differential privacy and secure aggregation yet; "
                    "ask with epsilon=... or with secagg=True")
            self.secagg.require(False, "analytics requests")
            return answer_dp(request, self.analytics, self.dp_ledger, peer=self.peer, msg_id=envelope.msg_id)
        if self.privacy.require_dp:
            raise FedlabDisclosureError(
                "require_dp: this node answers analytics only with differential privacy (privacy.require_dp); "
                "ask with an epsilon, e.g. researcher.stats(fds, ['mean'], epsilon=1.0, bounds={'age': (0, 120)}) "
                "or `%fed stats ... --epsilon 1`")
        if request.secagg is not None:
            return answer_secure(request, self.analytics, self.secagg)
        self.secagg.require(False, "analytics requests")
        return self.analytics(request)

    def _budget(self, envelope: Envelope) -> HandlerResult:
        request = envelope.content
        assert isinstance(request, PrivacyBudgetRequest)
        root = root_record(self.registry, self.registry.get(request.dataset_id))
        return PrivacyBudgetReply(dataset_id=request.dataset_id,
                                  balance=self.dp_ledger.balance(self.peer, source_key(root)))

    def _preprocess(self, envelope: Envelope) -> HandlerResult:
        assert isinstance(envelope.content, PreprocRequest)
        if self.preproc is None:
            raise FedlabConfigError(
                f"node {self.name} was started without a node directory, so it cannot write derived "
                "datasets; start it with `fedlab node start DIR` to use preprocessing")
        reply = self.preproc(envelope.content)
        if self.privacy.require_dp and getattr(reply, "partials", None) is not None:
            # a fitting step's partials are exact statistics of the data: not under require_dp
            raise FedlabDisclosureError(
                "require_dp: this node releases statistics only with differential privacy (privacy.require_dp), "
                f"and the preprocessing step {envelope.content.preproc_step!r} would send exact statistics "
                "of its data; fit its parameters from DP statistics (researcher.stats(..., epsilon=...)) instead")
        return reply

    def _list(self, envelope: Envelope) -> HandlerResult:
        return DatasetListReply(datasets=[r.to_info() for r in self.registry.list()])
