"""The node's answers to training messages: plan approval and status, one round of training, cancel.

Code from the network runs only once the node's operator approved its exact source (or, on
a node with ``require_approval = false``, unless they rejected it). Before that the source is
only parsed (``ast.parse``), never executed. The approval table is read at every request, so
a decision made with ``fedlab node plan approve|reject`` while the node runs applies to the
very next request.

An approved plan never runs in the node process: a round is handed to the node's training
worker process (:mod:`fedlab.node.plan_worker`), started at the first training message and
kept warm (torch imported once, a plan class compiled once per plan id, a dataset read once
per file version). This handler keeps what is the node's: the approval check, the dataset
registry (the worker gets a dataset's type and path, never the database), the optimizer and
Scaffold state between rounds (in node.db), the deadline (``training_timeout``), and the
progress events, which go to the researcher as ``TrainProgress`` whose parent is the request.
A ``TrainCancelRequest`` sets a flag that stops the round at its next iteration, or kills a
worker whose plan does not stop.

Differential privacy (``training_args["dp_args"]``): the worker trains privately (DP-SGD, or a clipped
and noised update); the node's budget is checked before the first step and spent before the reply
leaves (:mod:`fedlab.node.dp_rounds`). On a node with ``require_dp``, training rounds without
``dp_args`` and validation-only rounds (their metrics are exact) are refused.

Devices: the node's ``device`` setting (config.toml) goes with every round, and the worker trains where
it and ``training_args["use_gpu"]`` say (``fedlab.training.device``); the reply names the device, with
a note when it is not the one asked for (no GPU here, or the operator's rule), and the node logs it.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

import fedlab.errors as errors
from fedlab.errors import (
    FedlabConfigError,
    FedlabDisclosureError,
    FedlabError,
    FedlabProtocolError,
    FedlabRequestStopped,
    FedlabTrainingError,
)
from fedlab.node.approvals import ApprovalRegistry, check_plan_source
from fedlab.node.dp_ledger import DPLedger
from fedlab.node.dp_rounds import DPRoundAccount
from fedlab.node.held_results import HeldResults
from fedlab.node.plan_worker import PlanWorker, WorkerDied, WorkerTimeout
from fedlab.node.registry import DatasetRegistry
from fedlab.node.secagg_handler import SecaggHandler
from fedlab.node.training_state import StateStore
from fedlab.privacy.dp_rules import DPRules
from fedlab.privacy.dp_training import parse_dp_args
from fedlab.protocol import ArraySpec, Envelope, Message, make_envelope
from fedlab.training.args import TrainingArgs
from fedlab.training.messages import (
    NOT_REGISTERED,
    PENDING,
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
from fedlab.training.tensors import unpack_named
from fedlab.training.worker_wire import Failed, RoundProgress, RunRound

__all__ = ["TrainingHandler"]

log = logging.getLogger("fedlab.node")
Emit = Callable[[Envelope], None]
HandlerResult = Message | tuple[Message, Sequence[bytes | memoryview]]
DEFAULT_TIMEOUT = 3600.0  # seconds a round may take (node config `training_timeout`)
_NOTE_CHARS = 1024  # TrainReply.device_note's bound


class TrainingHandler:
    """Training messages for the datasets of ``registry``, gated by ``approvals``."""

    # differential privacy, set by the Dispatcher: the operator's [privacy] rules, the node's ledger, and
    # who asks (the researcher's key; one shared identity on an insecure node)
    privacy: DPRules = DPRules()
    dp_ledger: DPLedger | None = None
    peer: str = "insecure"
    _device: str = "auto"

    def __init__(
        self,
        registry: DatasetRegistry,
        *,
        node_id: str,
        name: str,
        require_approval: bool = True,
        threads: int = 0,
        timeout: float = DEFAULT_TIMEOUT,
        emit: Emit | None = None,
        approvals: ApprovalRegistry | None = None,
        states: StateStore | None = None,
        device: str = "auto",
    ) -> None:
        self.registry = registry
        self.approvals = approvals or ApprovalRegistry(registry.db_path)
        self.states = states or StateStore(registry.db_path)
        self.node_id = node_id
        self.name = name
        self.require_approval = require_approval
        self.threads = threads  # torch's intra-op threads in the worker; 0 leaves torch's default (one per core)
        self.timeout = timeout  # seconds a round may take before its worker is killed
        self.emit = emit
        self.worker = PlanWorker(node_name=name, threads=threads)
        self.device = device  # the node's device setting (config.toml), sent with every round
        self._lock = threading.Lock()
        self._cancel: dict[str, threading.Event] = {}
        self._warm = False
        self.secagg: SecaggHandler | None = None  # set by the dispatcher: secure aggregation of rounds
        self._vectors: list[Any] = []  # masked vectors, reused once nothing (a queued frame) holds them
        self.held = HeldResults(node_name=name)  # large results the researcher pulls in chunks

    @property
    def device(self) -> str:
        """The node's device setting (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``; see docs/gpu.md)."""
        return self._device

    @device.setter
    def device(self, setting: str) -> None:
        from fedlab.training.device import check_device_setting

        self._device = check_device_setting(setting)
        self.worker.device = self._device  # a worker started from now on warms that GPU up

    # -- approval ------------------------------------------------------------------------------
    def approve_request(self, envelope: Envelope) -> HandlerResult:
        """Queue a plan for the operator (after checking that it parses and defines its class)."""
        request = envelope.content
        assert isinstance(request, TrainingPlanApproveRequest)
        check_plan_source(request.plan_source, request.plan_class)
        record = self.approvals.request(request.plan_source, request.plan_class, request.description,
                                        request.researcher_id or envelope.sender)
        if record.status == PENDING:
            log.info("training plan %s (%s) awaits approval: %s", record.short_id, record.plan_class,
                     self.approvals.approve_command(record.plan_id))
        return TrainingPlanApproveReply(
            plan_id=record.plan_id, status=record.status, approval_required=self.require_approval,
            message=self.approvals.explain(record.plan_id, request.plan_class, record, node=self.name,
                                           require_approval=self.require_approval))

    def status_request(self, envelope: Envelope) -> HandlerResult:
        request = envelope.content
        assert isinstance(request, TrainingPlanStatusRequest)
        plan_id = _plan_id(request.plan_source)
        record = self.approvals.status(plan_id)
        return TrainingPlanStatusReply(
            plan_id=plan_id, status=record.status if record is not None else NOT_REGISTERED,
            approval_required=self.require_approval,
            message=self.approvals.explain(plan_id, request.plan_class, record, node=self.name,
                                           require_approval=self.require_approval))

    # -- warm-up -----------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Start the training worker (torch imported and warmed up in it), once.

        A cold torch costs seconds (the import, then lazy set-up at the first optimizer step
        and DataLoader). The runtime calls this on the training thread at the first training
        message, an approval or status request usually, so that the first round is as fast as
        the next ones. A failure is only logged (the train request that follows reports it).
        """
        with self._lock:
            if self._warm:
                return
            self._warm = True
        if importlib.util.find_spec("torch") is None:
            return
        try:
            self.worker.start()
        except FedlabError:
            log.exception("starting the training worker failed")

    def close(self) -> None:
        """Stop every training and the worker process (the node is shutting down)."""
        self.cancel_all()
        self.held.clear()
        self.worker.close()

    # -- cancel ------------------------------------------------------------------------------
    def expect(self, request_id: str) -> None:
        """Make ``request_id`` cancellable from the moment it arrives, while it waits for its turn."""
        with self._lock:
            self._cancel.setdefault(request_id, threading.Event())

    def cancel_request(self, envelope: Envelope) -> HandlerResult:
        request = envelope.content
        assert isinstance(request, TrainCancelRequest)
        with self._lock:
            flag = self._cancel.get(request.request_id)
        if flag is not None:
            flag.set()
            log.info("training request %s cancelled by %s", request.request_id, envelope.sender)
        return TrainCancelReply(cancelled=flag is not None)

    def cancel_all(self) -> None:
        """Stop every training at its next iteration (the node is shutting down)."""
        with self._lock:
            for flag in self._cancel.values():
                flag.set()

    # -- training ----------------------------------------------------------------------------
    def train_request(self, envelope: Envelope) -> HandlerResult:
        """One round of local training (or validation) with an approved plan; the reply's buffers
        are the updated parameters followed by the auxiliary variables.

        Large buffers are views of the node's memory file the round ran in (no copy): the transport
        sends them as they are, and that file is not used for another round while any of them is alive."""
        request = envelope.content
        assert isinstance(request, TrainRequest)
        with self._lock:
            flag = self._cancel.setdefault(envelope.msg_id, threading.Event())
        self.held.new_round(envelope.sender, request.experiment_id)  # frees the memory file the last one held
        try:
            reply, out = self._train(envelope, request, flag)
            return self._held_reply(envelope, request, reply, out)
        finally:
            with self._lock:
                self._cancel.pop(envelope.msg_id, None)

    def _train(self, envelope: Envelope, request: TrainRequest,
               flag: threading.Event) -> tuple[Message, Sequence[bytes | memoryview]]:
        self._require_dp(request, request.training_args.get("dp_args") is not None)
        if self.secagg is not None and request.do_training:
            self.secagg.require(request.secagg is not None, "training rounds")
        plan_id = self.approvals.check_allowed(request.plan_source, request.plan_class, node=self.name,
                                               require_approval=self.require_approval,
                                               researcher_id=envelope.sender)
        args = TrainingArgs.from_dict(request.training_args)
        dp = parse_dp_args(args.dp_args) if request.do_training else None
        _require_torch(self.name)
        record = self.registry.get(request.dataset_id)
        state = None
        if request.state_id is not None:
            state = self.states.get(request.state_id, experiment_id=request.experiment_id,
                                    dataset_id=record.dataset_id)
        if flag.is_set():
            raise FedlabRequestStopped(f"training cancelled on node {self.name} before it started")
        account = None
        if dp is not None:
            if self.dp_ledger is None:
                raise FedlabConfigError(f"node {self.name} keeps no privacy ledger, so it cannot train with DP")
            account = DPRoundAccount(self.dp_ledger, self.registry, record, peer=self.peer,
                                     experiment_id=request.experiment_id, round_=request.round, dp=dp, args=args)
        job = RunRound(
            job_id=envelope.msg_id, n_buffers=len(envelope.buffers), plan_id=plan_id,
            plan_source=request.plan_source, plan_class=request.plan_class, dataset_id=record.dataset_id,
            data_type=record.data_type, data_path=str(record.path), round=request.round,
            model_args=dict(request.model_args), training_args=dict(request.training_args),
            aggregator_args=dict(request.aggregator_args), params=list(request.params),
            aux_vars={k: list(v) for k, v in request.aux_vars.items()}, state=state,
            do_training=request.do_training, share_persistent_buffers=request.share_persistent_buffers,
            device=self.device)

        def progress(p: RoundProgress) -> None:
            self._send_event(envelope, TrainProgress(
                experiment_id=request.experiment_id, round=request.round, phase=p.phase, epoch=p.epoch,
                n_epochs=p.n_epochs, iteration=p.iteration, n_iterations=p.n_iterations, loss=p.loss))

        log.info("training round %d of %s on %s with plan %s (%s)", request.round, request.experiment_id,
                 record.name, plan_id[:12], request.plan_class)
        try:
            result, buffers = self.worker.run(job, envelope.buffers, timeout=self.timeout, cancelled=flag,
                                              on_progress=progress,
                                              on_dp_plan=account.check if account is not None else None)
        except WorkerTimeout:
            raise FedlabTrainingError(
                f"training plan {plan_id[:12]} ({request.plan_class}) ran past node {self.name}'s "
                f"training_timeout of {self.timeout:g} s and was stopped (its worker process was killed; the "
                "node keeps serving). Make a round shorter (fewer epochs or num_updates), or ask the node's "
                "operator to raise training_timeout in its config.toml") from None
        except WorkerDied as exc:
            raise FedlabTrainingError(
                f"the training worker of node {self.name} {exc} during round {request.round} of plan "
                f"{plan_id[:12]} ({request.plan_class}); this round is lost, the next one starts a fresh "
                "worker. If it happens again, the node's operator checks node.log (a plan using too much "
                "memory is a common cause)") from None
        if isinstance(result, Failed):
            raise _worker_error(result)
        state_id = request.state_id
        if result.state is not None:
            state_id = self.states.put(result.state, request.experiment_id, record.dataset_id)
        log.info("round %d of %s done on %s: %d samples, %d updates in %.2f s%s", request.round,
                 request.experiment_id, result.device, result.n_samples, result.n_updates, result.compute_seconds,
                 f" ({' and '.join(result.loaded)} loaded)" if result.loaded else "")
        if result.device_note:
            log.warning("round %d of %s: %s", request.round, request.experiment_id, result.device_note)
        if request.secagg is not None and request.do_training:
            reply, out = self._masked_reply(request, record.dataset_id, result, buffers, state_id)
        else:
            reply, out = TrainReply(
                experiment_id=request.experiment_id, round=request.round, dataset_id=record.dataset_id,
                params=list(result.params), n_samples=result.n_samples, n_test_samples=result.n_test_samples,
                n_updates=result.n_updates, train_loss=result.train_loss,
                metrics_before=dict(result.metrics_before), metrics_after=dict(result.metrics_after),
                aux_vars={k: list(v) for k, v in result.aux_vars.items()}, compute_seconds=result.compute_seconds,
                state_id=state_id, device=result.device, device_note=result.device_note[:_NOTE_CHARS]), buffers
        if account is not None:  # the spend commits here, last: the reply leaves only once it is recorded
            reply = msgspec.structs.replace(reply, dp=account.spend(result.n_updates, envelope.msg_id))
        return reply, out

    def _held_reply(self, envelope: Envelope, request: TrainRequest, reply: Message,
                    out: Sequence[bytes | memoryview]) -> HandlerResult:
        """The reply as it goes: whole, or (``hold_min_bytes``) its specs alone while the node holds the frames
        for the researcher to pull in chunks; a masked reply is one vector and always goes whole."""
        size = sum(memoryview(frame).nbytes for frame in out)
        if (not isinstance(reply, TrainReply) or reply.masked is not None or request.hold_min_bytes <= 0
                or size < request.hold_min_bytes or not out):
            return reply, out
        self.held.hold(envelope.msg_id, envelope.sender, request.experiment_id, out)
        return msgspec.structs.replace(reply, held=True), []

    def _require_dp(self, request: TrainRequest, with_dp: bool) -> None:
        """A node with ``require_dp`` trains only with dp_args, and sends no exact validation metrics."""
        if not self.privacy.require_dp:
            return
        if not request.do_training:
            raise FedlabDisclosureError(
                f"require_dp: node {self.name} releases nothing computed from its data without differential "
                "privacy (privacy.require_dp), and validation metrics are exact; evaluate the model on data of "
                "your own")
        if not with_dp:
            raise FedlabDisclosureError(
                f"require_dp: node {self.name} trains only with differential privacy (privacy.require_dp); ask "
                "with training_args['dp_args'] = {'type': 'local', 'sigma': 1.0, 'clip': 1.0} (DP-SGD) or "
                "{'type': 'central', ...}")

    def _masked_reply(self, request: TrainRequest, dataset_id: str, result: Any, buffers: Sequence[Any],
                      state_id: str | None) -> tuple[TrainReply, list[memoryview]]:
        """The round's parameters, aux vars and sample count as one masked vector (``request.secagg``).

        Metrics, the train loss and timings stay in the clear (see SECURITY.md); ``n_samples`` is 0."""
        from fedlab.secagg import train_vector

        secagg = request.secagg
        assert secagg is not None and self.secagg is not None
        params = unpack_named(result.params, buffers)
        aux = {group: unpack_named(specs, buffers) for group, specs in result.aux_vars.items()}
        vector = train_vector.encode(list(secagg.fields), params, aux, result.n_samples, secagg.weight_bound,
                                     out=self._free_vector(train_vector.vector_length(list(secagg.fields))))
        del params, aux
        self.secagg.mask(secagg, vector, "training")
        reply = TrainReply(
            experiment_id=request.experiment_id, round=request.round, dataset_id=dataset_id, params=[],
            n_samples=0, n_test_samples=result.n_test_samples, n_updates=result.n_updates,
            train_loss=result.train_loss, metrics_before=dict(result.metrics_before),
            metrics_after=dict(result.metrics_after), compute_seconds=result.compute_seconds, state_id=state_id,
            masked=ArraySpec(buffer=0, dtype="uint64", shape=[int(vector.size)]), secagg_session=secagg.session_id,
            device=result.device, device_note=result.device_note[:_NOTE_CHARS])
        return reply, [memoryview(vector.data).cast("B")]

    def _free_vector(self, length: int) -> Any:
        """A uint64 array of ``length`` that no frame still being sent holds, kept from round to round:
        a fresh 200 MB array costs more page faults than encoding into it. Two are kept (one may still be
        on the wire while the next round is encoded)."""
        import sys

        import numpy as np

        self._vectors = [v for v in self._vectors if v.size == length]
        for vector in self._vectors:
            if sys.getrefcount(vector) <= 3:  # this list, the loop variable, getrefcount's argument
                return vector
        vector = np.empty(length, np.uint64)
        self._vectors = [*self._vectors[-1:], vector]
        return vector

    def _send_event(self, request: Envelope, content: Message) -> None:
        if self.emit is None:
            return
        try:
            self.emit(make_envelope(content, self.node_id, parent_id=request.msg_id))
        except Exception:  # progress is best effort: never let it end a training
            log.exception("could not send a progress event for %s", request.msg_id)


def _worker_error(failed: Failed) -> FedlabError:
    """The ``fedlab.errors`` exception the worker reported, with its message (a plan error by default)."""
    cls = getattr(errors, failed.error, None)
    if cls is FedlabProtocolError:
        return FedlabProtocolError(failed.message, code=failed.code or "invalid_field")
    if isinstance(cls, type) and issubclass(cls, FedlabError):
        return cls(failed.message)
    return FedlabTrainingError(failed.message)


def _plan_id(source: str) -> str:
    from fedlab.training.source import plan_id

    return plan_id(source)


_TORCH_FOUND = False  # once found it stays installed for the node's life: no search of sys.path per round


def _require_torch(node_name: str) -> None:
    global _TORCH_FOUND
    if _TORCH_FOUND:
        return
    _TORCH_FOUND = importlib.util.find_spec("torch") is not None
    if not _TORCH_FOUND:
        raise FedlabConfigError(
            f"node {node_name} cannot train: torch is not installed in its Python environment. Its operator "
            "installs the training extra (`pip install 'fedlab-research[torch]'`) and restarts the node "
            "(`fedlab node start DIR`)")
