"""The seed's training jobs: ask nodes to approve a plan, check its status, train one round.

``TrainingPlanApproveJob`` queues a plan for each node operator's decision and
``TrainingPlanCheckJob`` asks whether it may run; both use ``DiscardOnTimeout(5)`` as the
seed does, and return the replies by node (``errors`` and ``missing`` say who did not).

``TrainingJob`` is one round: one ``TrainRequest`` per node carrying the plan, the global
parameters, the arguments and that node's aggregator inputs. The parameters are packed
once and the same buffers go in every node's message (serialize once, send many). Replies
are handed to ``on_reply`` as they arrive, so the aggregator folds each one in and the
reply can be dropped: the researcher holds the global model, the aggregator's sums and the
replies not yet folded in. Replies that arrive together are all received at once by zmq,
so that last part can reach one model per node (nothing here paces the nodes' sends). A
node that fails is left out of the round with its reason; a node still computing when the
round ends (timeout, stopped) is sent a ``TrainCancelRequest`` so it stops.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from fedlab.errors import FedlabError, FedlabProtocolError
from fedlab.protocol import Envelope
from fedlab.researcher.held_fetch import HeldResult, ResultLost
from fedlab.researcher.jobs import Job
from fedlab.researcher.policies import DiscardOnTimeout, RequestPolicy
from fedlab.researcher.requests import FederatedRequest, MessagesByNode, Requests
from fedlab.training.messages import (
    APPROVED,
    TrainCancelReply,
    TrainCancelRequest,
    TrainingPlanApproveReply,
    TrainingPlanApproveRequest,
    TrainingPlanStatusReply,
    TrainingPlanStatusRequest,
    TrainProgress,
    TrainReply,
    TrainRequest,
)
from fedlab.training.tensors import pack_named, unpack_named

__all__ = ["REFUSALS", "NodeRound", "TrainResult", "TrainingJob", "TrainingPlanApproveJob",
           "TrainingPlanCheckJob", "check_plain"]

log = logging.getLogger("fedlab.researcher")
Arrays = Mapping[str, np.ndarray]
CANCEL_TIMEOUT = 2.0
# a node's error codes for a round its own rules refused (its privacy budget, require_dp): status "refused"
REFUSALS = ("budget_exhausted", "disclosure_refused")


def check_plain(**args: Mapping[str, Any]) -> None:
    """Arguments travel as msgpack (and go into breakpoints as JSON): only plain values, no numpy or objects."""
    for name, value in args.items():
        try:
            msgspec.json.encode(value)
        except (TypeError, msgspec.EncodeError) as exc:
            raise FedlabError(f"{name} must hold plain values (int, float, str, bool, None, lists and dicts "
                              f"of them): {exc}") from None


class TrainingPlanApproveJob(Job):
    """Queue ``plan_source`` for approval on each node; ``execute()`` -> ``{node_id: reply}``.

    A reply means the plan is registered on the node (usually as ``Pending``), not that it
    is approved: the node's operator decides.
    """

    def __init__(self, plan_source: str, plan_class: str, description: str, *, researcher_id: str,
                 requests: Requests, nodes: Iterable[str], policies: Sequence[RequestPolicy] | None = None) -> None:
        super().__init__(researcher_id=researcher_id, requests=requests, nodes=nodes,
                         policies=policies or [DiscardOnTimeout(5)])
        self._message = TrainingPlanApproveRequest(plan_source=plan_source, plan_class=plan_class,
                                                   description=description, researcher_id=researcher_id)

    def execute(self) -> dict[str, TrainingPlanApproveReply]:
        messages = MessagesByNode({n: self._message for n in self.nodes or []})
        return self._send(messages, TrainingPlanApproveReply, "the training plan approval request")


class TrainingPlanCheckJob(Job):
    """Ask each node whether ``plan_source`` may run there; ``execute()`` -> ``{node_id: reply}``."""

    def __init__(self, experiment_id: str | None, plan_source: str, plan_class: str, *, researcher_id: str,
                 requests: Requests, nodes: Iterable[str], policies: Sequence[RequestPolicy] | None = None) -> None:
        super().__init__(researcher_id=researcher_id, requests=requests, nodes=nodes,
                         policies=policies or [DiscardOnTimeout(5)])
        self.experiment_id = experiment_id
        self._message = TrainingPlanStatusRequest(plan_source=plan_source, plan_class=plan_class)

    def execute(self) -> dict[str, TrainingPlanStatusReply]:
        messages = MessagesByNode({n: self._message for n in self.nodes or []})
        replies = self._send(messages, TrainingPlanStatusReply, "the training plan status request")
        for node_id, reply in replies.items():
            if reply.approval_required and reply.status != APPROVED:
                log.info("training plan %s is %s on node %s: %s", reply.plan_id[:12], reply.status, node_id,
                         reply.message)
        return replies


@dataclass
class TrainResult:
    """One node's reply, decoded: what ``TrainingJob`` hands to ``on_reply`` (arrays are read-only views)."""

    node_id: str
    params: dict[str, np.ndarray]
    aux_vars: dict[str, dict[str, np.ndarray]]
    reply: TrainReply
    seconds: float  # researcher side, from sending to the reply's arrival
    masked: np.ndarray | None = None  # under secure aggregation: the node's masked vector (uint64), all there is
    held: HeldResult | None = None  # the node holds the parameters, to be pulled in chunks (``held_fetch``)


@dataclass
class NodeRound:
    """What happened on one node in one round (no arrays): a row of the experiment's history."""

    node_id: str
    status: str  # "ok", "refused" (by the node's privacy rules or budget), "error" or "missing"
    reason: str = ""
    n_samples: int | None = 0  # None: hidden (secure aggregation)
    n_test_samples: int = 0
    n_updates: int = 0
    train_loss: float | None = None
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    total_seconds: float | None = None
    compute_seconds: float | None = None
    state_id: str | None = None
    # a DP round: the ε and δ it spent on the node, and this researcher's balance there afterwards
    epsilon: float | None = None
    delta: float | None = None
    epsilon_spent: float | None = None
    epsilon_remaining: float | None = None
    code: str = ""  # a node's error code ("budget_exhausted", "disclosure_refused", ...)
    device: str = ""  # where the round trained ("cpu", "cuda:0"), and why when not where use_gpu asked
    device_note: str = ""


class TrainingJob(Job):
    """One round of training (or validation only, ``do_training=False``) on every node."""

    def __init__(
        self,
        experiment_id: str,
        round_: int,
        dataset_ids: Mapping[str, str],
        plan_source: str,
        plan_class: str,
        params: Arrays,
        *,
        researcher_id: str,
        requests: Requests,
        nodes: Iterable[str] | None = None,
        policies: Sequence[RequestPolicy] | None = None,
        model_args: Mapping[str, Any] | None = None,
        training_args: Mapping[str, Any] | None = None,
        aggregator_args: Mapping[str, Mapping[str, Any]] | None = None,
        aux_vars: Mapping[str, Mapping[str, Arrays]] | None = None,
        state_ids: Mapping[str, str | None] | None = None,
        do_training: bool = True,
        share_persistent_buffers: bool = True,
        on_reply: Callable[[TrainResult], None] | None = None,
        on_progress: Callable[[str, TrainProgress], None] | None = None,
        secagg_arguments: Mapping[str, Any] | None = None,
        hold_min_bytes: int = 0,
    ) -> None:
        """``hold_min_bytes``: nodes keep replies of at least that many bytes and answer their specs only
        (``TrainResult.held``), for ``on_reply`` to pull in chunks (``fedlab.researcher.held_fetch``); 0 sends
        every reply whole. ``secagg_arguments`` (Fed-BioMed's name) makes the round securely aggregated: ``secure_sum``
        (a set-up ``SecureSum``), ``fields`` (``fedlab.secagg.train_vector.layout``) and ``weight_bound``.
        Each node then answers one masked vector; ``masked_sum`` adds them up as they arrive and
        ``masked_nodes`` says whose are in it (``SecureSum.unmask`` takes both)."""
        super().__init__(researcher_id=researcher_id, requests=requests,
                         nodes=nodes if nodes is not None else list(dataset_ids), policies=policies)
        self.experiment_id, self.round = experiment_id, round_
        self._dataset_ids = dict(dataset_ids)
        self._plan = (plan_source, plan_class)
        self._params = params
        self._model_args = dict(model_args or {})
        self._training_args = dict(training_args or {})
        self._aggregator_args = {n: dict(a) for n, a in (aggregator_args or {}).items()}
        self._aux_vars = dict(aux_vars or {})
        self._state_ids = dict(state_ids or {})
        self._do_training = do_training
        self._share = share_persistent_buffers
        self._on_reply = on_reply
        self._on_progress = on_progress
        self.results: dict[str, NodeRound] = {}
        self._secagg = dict(secagg_arguments) if secagg_arguments else None
        self._hold_min_bytes = 0 if self._secagg is not None or not do_training else int(hold_min_bytes)
        self.masked_sum: np.ndarray | None = None
        self.masked_nodes: list[str] = []

    def _messages(self) -> MessagesByNode:
        specs, buffers = pack_named(self._params)  # once: every node's message shares these frames
        packed_aux: dict[int, tuple[dict[str, list[Any]], list[memoryview]]] = {}
        messages = MessagesByNode()
        for node_id in self.nodes or []:
            aux = self._aux_vars.get(node_id, {})
            if id(aux) not in packed_aux:  # nodes given the same aux mapping share its frames too
                aux_specs: dict[str, list[Any]] = {}
                aux_buffers: list[memoryview] = []
                for name, arrays in aux.items():
                    aux_specs[name], frames = pack_named(arrays, len(buffers) + len(aux_buffers))
                    aux_buffers += frames
                packed_aux[id(aux)] = (aux_specs, aux_buffers)
            aux_specs, aux_buffers = packed_aux[id(aux)]
            message = TrainRequest(
                experiment_id=self.experiment_id, round=self.round, dataset_id=self._dataset_ids[node_id],
                plan_source=self._plan[0], plan_class=self._plan[1], params=specs, model_args=self._model_args,
                training_args=self._training_args, aggregator_args=self._aggregator_args.get(node_id, {}),
                aux_vars=aux_specs, state_id=self._state_ids.get(node_id), do_training=self._do_training,
                share_persistent_buffers=self._share, secagg=self._secagg_input(node_id),
                hold_min_bytes=self._hold_min_bytes)
            messages[node_id] = (message, [*buffers, *aux_buffers])
        return messages

    def _secagg_input(self, node_id: str) -> Any:
        if self._secagg is None:
            return None
        return self._secagg["secure_sum"].input_for(node_id, fields=list(self._secagg["fields"]),
                                                    weight_bound=int(self._secagg["weight_bound"]))

    def _masked(self, reply: TrainReply, envelope: Envelope) -> np.ndarray:
        """The node's masked vector, checked against the round's layout; a plain reply is refused (it
        would be a node's parameters in the clear, which a secure round never keeps)."""
        from fedlab.secagg.train_vector import vector_length

        assert self._secagg is not None
        expected = vector_length(list(self._secagg["fields"]))
        spec = reply.masked
        if (spec is None or reply.params or reply.aux_vars or spec.dtype != "uint64" or spec.shape != [expected]
                or spec.buffer >= len(envelope.buffers) or len(envelope.buffers[spec.buffer]) != expected * 8):
            raise FedlabProtocolError(
                f"the node did not answer the secure round with one masked vector of {expected} uint64 values; "
                "is it running a fedlab version with secure aggregation?", code="unexpected_reply")
        return np.frombuffer(envelope.buffers[spec.buffer], np.uint64)

    def _progress(self, node_id: str, envelope: Envelope) -> None:
        if self._on_progress is not None and isinstance(envelope.content, TrainProgress):
            self._on_progress(node_id, envelope.content)

    def _decode(self, node_id: str, envelope: Envelope, seconds: float) -> TrainResult:
        reply = envelope.content
        if not isinstance(reply, TrainReply):
            raise FedlabProtocolError(f"expected a train_reply, got a {envelope.msg_type}", code="unexpected_reply")
        if reply.round != self.round or reply.experiment_id != self.experiment_id:
            raise FedlabProtocolError(f"the reply is for round {reply.round} of experiment {reply.experiment_id}, "
                                      f"not round {self.round} of {self.experiment_id}", code="unexpected_reply")
        if self._do_training and self._training_args.get("dp_args") is not None and reply.dp is None:
            raise FedlabProtocolError("the node answered a DP round without saying what it spent on its privacy "
                                      "budget; is it running a fedlab version with DP training?",
                                      code="unexpected_reply")
        if self._secagg is not None and self._do_training:
            return TrainResult(node_id, {}, {}, reply, seconds, masked=self._masked(reply, envelope))
        if reply.held:
            if not self._hold_min_bytes:
                raise FedlabProtocolError("the node held its result although it was asked to send it whole",
                                          code="unexpected_reply")
            return TrainResult(node_id, {}, {}, reply, seconds, held=HeldResult(node_id, envelope.parent_id or "",
                                                                                reply))
        params = unpack_named(reply.params, envelope.buffers)
        aux = {name: unpack_named(specs, envelope.buffers) for name, specs in reply.aux_vars.items()}
        return TrainResult(node_id, params, aux, reply, seconds)

    def execute(self) -> dict[str, NodeRound]:
        """Run the round; ``{node_id: NodeRound}`` for every node asked, whatever happened to it."""
        nodes = self.nodes or []
        what = f"round {self.round}" if self._do_training else f"validation (round {self.round})"
        with self.RequestTimer(nodes) as timer:
            request = self.requests.send(self._messages(), nodes, self._policies, on_event=self._progress)
            answered: set[str] = set()
            try:
                for node_id, envelope in request.as_completed():
                    answered.add(node_id)
                    self._take(node_id, envelope, time.monotonic() - request.started, what)
                    del envelope  # one reply held at a time
            except BaseException:  # interrupted (Ctrl-C, a bug): stop the nodes, don't wait out the round
                request.__exit__(None, None, None)
                self._cancel(request, [n for n in request.msg_ids if n not in answered])
                raise
            timer.stop(request)
        self.timings = timer.timings
        self.errors, self.missing = request.errors(), request.missing()
        self._cancel(request, [n for n, m in self.missing.items() if m.reason in ("timeout", "stopped")])
        for node_id, error in self.errors.items():
            self._fail(node_id, f"[{error.code}] {error.message}", what, error.code)
        for node_id, why in self.missing.items():
            log.warning("node %s did not answer %s: %s", node_id, what, why)
            self.results[node_id] = NodeRound(node_id, "missing", reason=f"{why.reason}: {why.detail}")
        for node_id, row in self.results.items():
            row.total_seconds = self.timings.get(node_id)
        return {n: self.results[n] for n in nodes if n in self.results}

    def _take(self, node_id: str, envelope: Envelope, seconds: float, what: str) -> None:
        """Decode one reply, hand it to ``on_reply``, keep its summary; a bad or refused reply fails the node."""
        try:
            result = self._decode(node_id, envelope, seconds)
            if result.masked is not None:
                self._fold_masked(node_id, result.masked)
            if self._on_reply is not None:
                self._on_reply(result)
        except ResultLost as exc:  # it died (or answered wrong) while its update was being pulled
            log.warning("node %s: %s", node_id, exc)
            self.results[node_id] = NodeRound(node_id, "missing", reason=f"{exc.reason}: {exc.detail}")
            return
        except FedlabProtocolError as exc:
            self._fail(node_id, f"[{exc.code}] {exc}", what)
            return
        except FedlabError as exc:  # the aggregator refused it (shapes, names): out of this round
            self._fail(node_id, f"[rejected] {exc}", what)
            return
        r = result.reply
        dp = r.dp
        self.results[node_id] = NodeRound(
            node_id, "ok", n_samples=None if result.masked is not None else r.n_samples,
            n_test_samples=r.n_test_samples, n_updates=r.n_updates,
            train_loss=r.train_loss, metrics_before=dict(r.metrics_before), metrics_after=dict(r.metrics_after),
            compute_seconds=r.compute_seconds, state_id=r.state_id,
            epsilon=None if dp is None else dp.epsilon, delta=None if dp is None else dp.delta,
            epsilon_spent=None if dp is None else dp.balance.epsilon_spent,
            epsilon_remaining=None if dp is None else dp.balance.epsilon_remaining,
            device=r.device, device_note=r.device_note)

    def _fold_masked(self, node_id: str, masked: np.ndarray) -> None:
        """Add a masked vector into the round's sum (mod 2**64, in place): one vector kept, not one per node."""
        if self.masked_sum is None:
            reuse = self._secagg.get("sum_buffer") if self._secagg else None
            if reuse is not None and reuse.shape == masked.shape:
                np.copyto(reuse, masked)  # memory kept from the last round: no fresh pages to fault in
                self.masked_sum = reuse
            else:
                self.masked_sum = masked.copy()
        else:
            np.add(self.masked_sum, masked, out=self.masked_sum)
        self.masked_nodes.append(node_id)

    def _fail(self, node_id: str, reason: str, what: str, code: str = "") -> None:
        refused = code in REFUSALS
        (log.warning if refused else log.error)("node %s %s %s: %s", node_id, "refused" if refused else "failed",
                                                what, reason)
        self.results[node_id] = NodeRound(node_id, "refused" if refused else "error", reason=reason, code=code)

    def _cancel(self, request: FederatedRequest, nodes: list[str]) -> None:
        """Tell ``nodes``, which may still be computing this round, to stop; the wait is bounded."""
        running = {n: request.msg_ids[n] for n in nodes if n in request.msg_ids}
        if not running:
            return
        cancels = MessagesByNode({n: TrainCancelRequest(request_id=msg_id) for n, msg_id in running.items()})
        with self.requests.send(cancels, list(running), [DiscardOnTimeout(CANCEL_TIMEOUT)]) as cancel:
            for node_id, envelope in cancel.replies().items():
                if isinstance(envelope.content, TrainCancelReply):
                    log.info("node %s %s round %s", node_id,
                             "cancelled" if envelope.content.cancelled else "had already finished", self.round)
