"""The node's answers to training messages: plan approval and status, one round of training, cancel.

Code from the network runs only once the node's operator approved its exact source (or, on
a node with ``require_approval = false``, unless they rejected it). Before that the source is
only parsed (``ast.parse``), never executed. The approval table is read at every request, so
a decision made with ``fedlab node plan approve|reject`` while the node runs applies to the
very next request.

A training request runs on the node's one training thread (see :mod:`fedlab.node.runtime`).
Everything slow is done once and kept: torch is imported (and warmed up) at the first
training message, a plan class is loaded once per plan id, a dataset read once per file
version (each round gets its own copy of a table, so a plan that pops its target column
leaves the next round's data as it was). Progress
goes to the researcher as ``TrainProgress`` events whose parent is the request, and a
``TrainCancelRequest`` sets a flag that the training loop checks at every iteration.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from fedlab.errors import (
    FedlabConfigError,
    FedlabDatasetError,
    FedlabRequestStopped,
)
from fedlab.node.approvals import ApprovalRegistry, check_plan_source
from fedlab.node.registry import DatasetRegistry
from fedlab.node.training_state import StateStore
from fedlab.protocol import Envelope, Message, make_envelope
from fedlab.training.messages import (
    NOT_REGISTERED,
    PENDING,
    NamedArray,
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

__all__ = ["TrainingHandler"]

log = logging.getLogger("fedlab.node")
Emit = Callable[[Envelope], None]
HandlerResult = Message | tuple[Message, Sequence[bytes | memoryview]]
_PLAN_CACHE = 16  # plan classes kept loaded
_DATA_CACHE = 4  # datasets kept in memory


class TrainingHandler:
    """Training messages for the datasets of ``registry``, gated by ``approvals``."""

    def __init__(
        self,
        registry: DatasetRegistry,
        *,
        node_id: str,
        name: str,
        require_approval: bool = True,
        threads: int = 0,
        emit: Emit | None = None,
        approvals: ApprovalRegistry | None = None,
        states: StateStore | None = None,
    ) -> None:
        self.registry = registry
        self.approvals = approvals or ApprovalRegistry(registry.db_path)
        self.states = states or StateStore(registry.db_path)
        self.node_id = node_id
        self.name = name
        self.require_approval = require_approval
        self.threads = threads  # torch's intra-op threads; 0 leaves torch's default (one per core)
        self.emit = emit
        self._lock = threading.Lock()
        self._cancel: dict[str, threading.Event] = {}
        self._plans: OrderedDict[tuple[str, str], type] = OrderedDict()
        self._data: OrderedDict[str, tuple[tuple[int, int], Any]] = OrderedDict()
        self._warm = False

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
        """Import torch and the training loop, and take one tiny optimizer step, once per process.

        A cold torch costs seconds (the import, then lazy set-up at the first optimizer step
        and DataLoader). The runtime calls this on the training thread at the first training
        message, an approval or status request usually, so that the first round is as fast as
        the next ones. Touches no random state; a failure is only logged (the train request
        that follows reports it properly).
        """
        with self._lock:
            if self._warm:
                return
            self._warm = True
        if importlib.util.find_spec("torch") is None:
            return
        started = time.monotonic()
        try:
            import torch
            import torch.utils.data

            import fedlab.training.loop  # noqa: F401

            if self.threads:
                torch.set_num_threads(self.threads)
            weight = torch.zeros(2, requires_grad=True)
            optimizer = torch.optim.SGD([weight], lr=0.1)
            (weight * weight).sum().backward()
            optimizer.step()
            batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), batch_size=2,
                                                  shuffle=True, generator=torch.Generator().manual_seed(0))
            for _ in batches:
                pass
        except Exception:
            log.exception("warming up torch failed")
            return
        log.info("torch %s loaded for training in %.1f s", torch.__version__, time.monotonic() - started)

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
        are the updated parameters followed by the auxiliary variables."""
        request = envelope.content
        assert isinstance(request, TrainRequest)
        with self._lock:
            flag = self._cancel.setdefault(envelope.msg_id, threading.Event())
        try:
            return self._train(envelope, request, flag)
        finally:
            with self._lock:
                self._cancel.pop(envelope.msg_id, None)

    def _train(self, envelope: Envelope, request: TrainRequest, flag: threading.Event) -> HandlerResult:
        plan_id = self.approvals.check_allowed(request.plan_source, request.plan_class, node=self.name,
                                               require_approval=self.require_approval,
                                               researcher_id=envelope.sender)
        _require_torch(self.name)
        self.warm_up()  # once per process: torch loaded, its thread count set
        from fedlab.training.loop import Progress, run_round
        from fedlab.training.state import decode_state, encode_state
        from fedlab.training.tensors import pack_named, unpack_named

        record = self.registry.get(request.dataset_id)
        dataset = self._dataset(record.dataset_id, record.data_type, record.path)
        plan_cls = self._plan_class(plan_id, request.plan_source, request.plan_class)
        state_arrays, state_meta = None, None
        if request.state_id is not None:
            blob = self.states.get(request.state_id, experiment_id=request.experiment_id,
                                   dataset_id=record.dataset_id)
            state_arrays, state_meta = decode_state(blob)
        params = unpack_named(request.params, envelope.buffers) if request.params else None
        aux_vars = {name: unpack_named(specs, envelope.buffers) for name, specs in request.aux_vars.items()}
        if flag.is_set():
            raise FedlabRequestStopped(f"training cancelled on node {self.name} before it started")

        def progress(p: Progress) -> None:
            self._send_event(envelope, TrainProgress(
                experiment_id=request.experiment_id, round=request.round, phase=p.phase, epoch=p.epoch,
                n_epochs=p.n_epochs, iteration=p.iteration, n_iterations=p.n_iterations, loss=p.loss))

        log.info("training round %d of %s on %s with plan %s (%s)", request.round, request.experiment_id,
                 record.name, plan_id[:12], request.plan_class)
        result = run_round(
            plan_cls, dataset, round=request.round, model_args=dict(request.model_args),
            training_args=dict(request.training_args), params=params,
            aggregator_args=dict(request.aggregator_args), aux_vars=aux_vars or None,
            state_arrays=state_arrays, state_meta=state_meta, do_training=request.do_training,
            share_persistent_buffers=request.share_persistent_buffers, progress=progress,
            should_stop=flag.is_set)
        state_id = request.state_id
        # Only arrays (moments, control variates) need keeping: the hyperparameters in the meta come
        # from the next request's optimizer_args anyway. Plain SGD keeps nothing and writes nothing.
        if request.do_training and result.state_arrays:
            state_id = self.states.put(encode_state(result.state_arrays, result.state_meta),
                                       request.experiment_id, record.dataset_id)
        specs, buffers = pack_named(result.params)
        out_buffers: list[bytes | memoryview] = list(buffers)
        aux_out: dict[str, list[NamedArray]] = {}
        for name, arrays in result.aux_vars.items():
            aux_specs, aux_buffers = pack_named(arrays, first_buffer=len(out_buffers))
            aux_out[name] = list(aux_specs)
            out_buffers += aux_buffers
        log.info("round %d of %s done: %d samples, %d updates in %.2f s", request.round, request.experiment_id,
                 result.n_samples, result.n_updates, result.compute_seconds)
        reply = TrainReply(
            experiment_id=request.experiment_id, round=request.round, dataset_id=record.dataset_id,
            params=list(specs), n_samples=result.n_samples, n_test_samples=result.n_test_samples,
            n_updates=result.n_updates, train_loss=_float_or_none(result.train_loss),
            metrics_before={k: float(v) for k, v in result.metrics_before.items()},
            metrics_after={k: float(v) for k, v in result.metrics_after.items()},
            aux_vars=aux_out, compute_seconds=float(result.compute_seconds), state_id=state_id)
        return reply, out_buffers

    def _send_event(self, request: Envelope, content: Message) -> None:
        if self.emit is None:
            return
        try:
            self.emit(make_envelope(content, self.node_id, parent_id=request.msg_id))
        except Exception:  # progress is best effort: never let it end a training
            log.exception("could not send a progress event for %s", request.msg_id)

    def _plan_class(self, plan_id: str, source: str, plan_class: str) -> type:
        """The plan's class, loaded once per plan id (nothing is re-imported per round)."""
        from fedlab.training.source import load_plan_class

        key = (plan_id, plan_class)
        with self._lock:
            cls = self._plans.get(key)
            if cls is not None:
                self._plans.move_to_end(key)
                return cls
        cls = load_plan_class(source, plan_class)
        with self._lock:
            self._plans[key] = cls
            while len(self._plans) > _PLAN_CACHE:
                self._plans.popitem(last=False)
        return cls

    def _dataset(self, dataset_id: str, data_type: str, path: str) -> Any:
        """The dataset as the plan sees it, read again only when its file (or folder) changed."""
        dataset = self._cached_dataset(dataset_id, data_type, path)
        return dataset.copy() if isinstance(dataset, pd.DataFrame) else dataset

    def _cached_dataset(self, dataset_id: str, data_type: str, path: str) -> Any:
        from fedlab.training.data import load_dataset

        try:
            stat = os.stat(path)
        except OSError as exc:
            raise FedlabDatasetError(
                f"dataset {dataset_id} is no longer readable on node {self.name} ({exc.strerror}); "
                "the node's operator should register it again") from None
        version = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._data.get(dataset_id)
            if cached is not None and cached[0] == version:
                self._data.move_to_end(dataset_id)
                return cached[1]
        dataset = load_dataset(data_type, path)
        with self._lock:
            self._data[dataset_id] = (version, dataset)
            while len(self._data) > _DATA_CACHE:
                self._data.popitem(last=False)
        return dataset


def _plan_id(source: str) -> str:
    from fedlab.training.source import plan_id

    return plan_id(source)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _require_torch(node_name: str) -> None:
    if importlib.util.find_spec("torch") is None:
        raise FedlabConfigError(
            f"node {node_name} cannot train: torch is not installed in its Python environment. Its operator "
            "installs the training extra (`pip install 'fedlab-research[torch]'`) and restarts the node "
            "(`fedlab node start DIR`)")
