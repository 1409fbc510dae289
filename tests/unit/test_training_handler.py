"""The node's side of training, in process: the approval gate, one real round on the breast cancer
data, progress events, cancel, plan errors, and what is loaded once and kept."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from plan_sources import LOGREG_PLAN, failing, with_delay
from sklearn.datasets import load_breast_cancer

from fedlab.node import training_handler as handler_module
from fedlab.node.approvals import ApprovalRegistry
from fedlab.node.config import init_node_dir
from fedlab.node.dispatch import Dispatcher
from fedlab.node.registry import DatasetRecord, DatasetRegistry
from fedlab.protocol import Envelope, ErrorReply, Message, make_envelope
from fedlab.training.messages import (
    APPROVED,
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
from fedlab.training.source import plan_id
from fedlab.training.tensors import pack_named, unpack_named

PLAN = LOGREG_PLAN
SLOW_PLAN = with_delay(0.02)
FAILING_PLAN = failing()
N_FEATURES = 30


class Node:
    """A dispatcher over a real node.db holding the breast cancer data, recording the events it emits."""

    def __init__(self, tmp_path: Path, *, require_approval: bool = True) -> None:
        self.config = init_node_dir(tmp_path / "node", "hospital")
        self.registry = DatasetRegistry(self.config.db_path)
        self.csv = tmp_path / "bc.csv"
        load_breast_cancer(as_frame=True).frame.iloc[:200].to_csv(self.csv, index=False)
        self.dataset: DatasetRecord = self.registry.add("bc", ["bc"], "csv", self.csv)
        self.events: list[Envelope] = []
        self.dispatcher = Dispatcher(self.config.node_id, "hospital", self.registry, node_dir=self.config.directory,
                                     require_approval=require_approval, emit=self.events.append)
        self.approvals = ApprovalRegistry(self.config.db_path)
        _OPEN.append(self)

    def send(self, content: Message, buffers: tuple[bytes | memoryview, ...] = (), msg_id: str | None = None
             ) -> Envelope:
        return self.dispatcher.handle(make_envelope(content, "researcher-1", buffers=buffers, msg_id=msg_id))

    def ask(self, source: str = PLAN, plan_class: str = "LogReg") -> Message:
        return self.send(TrainingPlanApproveRequest(plan_source=source, plan_class=plan_class,
                                                    description="logistic regression")).content

    def approve(self, source: str = PLAN) -> str:
        self.ask(source)
        return self.approvals.approve(plan_id(source)).plan_id

    def train(self, source: str = PLAN, *, params: dict[str, np.ndarray] | None = None, msg_id: str | None = None,
              **kw: object) -> Envelope:
        specs, buffers = pack_named(params or {})
        fields: dict[str, object] = {
            "experiment_id": "exp-1", "round": 0, "dataset_id": self.dataset.dataset_id,
            "plan_source": source, "plan_class": "LogReg", "params": specs,
            "model_args": {"n_features": N_FEATURES}, "training_args": {"epochs": 1, "batch_size": 32},
        }
        fields.update(kw)
        return self.send(TrainRequest(**fields), tuple(buffers), msg_id=msg_id)  # type: ignore[arg-type]


_OPEN: list[Node] = []


@pytest.fixture(autouse=True)
def _stop_workers() -> Iterator[None]:
    """Every test's training worker processes end with the test."""
    yield
    while _OPEN:
        _OPEN.pop().dispatcher.training.close()


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def error_of(envelope: Envelope) -> ErrorReply:
    assert isinstance(envelope.content, ErrorReply), envelope.content
    return envelope.content


# --- approval ---------------------------------------------------------------------------------


def test_approve_request_queues_the_plan_and_names_the_operator_command(node: Node) -> None:
    reply = node.ask()
    assert isinstance(reply, TrainingPlanApproveReply)
    pid = plan_id(PLAN)
    assert (reply.plan_id, reply.status, reply.approval_required) == (pid, PENDING, True)
    assert f"`fedlab node plan approve {node.config.directory} {pid[:12]}`" in reply.message
    record = node.approvals.status(pid)
    assert record is not None and record.researcher_id == "researcher-1" and record.description == "logistic regression"


def test_status_request_before_and_after_the_decision(node: Node) -> None:
    status = node.send(TrainingPlanStatusRequest(plan_source=PLAN, plan_class="LogReg")).content
    assert isinstance(status, TrainingPlanStatusReply) and status.status == NOT_REGISTERED
    assert "send an approval request first" in status.message
    assert node.approvals.list() == []  # asking for the status registers nothing
    node.approve()
    status = node.send(TrainingPlanStatusRequest(plan_source=PLAN, plan_class="LogReg")).content
    assert isinstance(status, TrainingPlanStatusReply) and status.status == APPROVED
    assert status.plan_id == plan_id(PLAN)


def test_approval_request_never_executes_the_plan(node: Node, tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    source = PLAN + f"\nopen({str(marker)!r}, 'w').close()\n"
    assert isinstance(node.ask(source), TrainingPlanApproveReply)
    node.send(TrainingPlanStatusRequest(plan_source=source, plan_class="LogReg"))
    assert error_of(node.train(source)).code == "not_approved"
    assert not marker.exists()


@pytest.mark.parametrize(("source", "plan_class", "fragment"), [
    ("class LogReg(:\n    pass\n", "LogReg", "not valid Python"),
    (PLAN, "Missing", "no class 'Missing'"),
    ("def LogReg():\n    pass\n", "LogReg", "classes found: none"),
    ("x = 1\0\n", "LogReg", "null bytes"),
])
def test_plan_that_does_not_parse_or_lacks_its_class_is_refused(node: Node, source: str, plan_class: str,
                                                                fragment: str) -> None:
    reply = node.send(TrainingPlanApproveRequest(plan_source=source, plan_class=plan_class)).content
    assert isinstance(reply, ErrorReply) and reply.code == "plan_error" and fragment in reply.message
    assert node.approvals.list() == []


def test_train_is_refused_until_approved_and_after_rejection(node: Node) -> None:
    pid = plan_id(PLAN)
    refused = error_of(node.train())
    assert refused.code == "not_approved"
    assert pid in refused.message and NOT_REGISTERED in refused.message
    node.ask()
    refused = error_of(node.train())
    assert refused.code == "not_approved" and pid in refused.message and PENDING in refused.message
    # an error reply never names the node's directory (fedlab.node.safe_errors)
    assert f"fedlab node plan approve <path on the node> {pid[:12]}" in refused.message
    node.approvals.approve(pid)
    assert isinstance(node.train().content, TrainReply)
    node.approvals.reject(pid, note="uses too much memory")
    refused = error_of(node.train())
    assert refused.code == "not_approved" and "Rejected" in refused.message and "too much memory" in refused.message


def test_a_plan_one_byte_different_is_not_approved(node: Node) -> None:
    node.approve()
    assert error_of(node.train(PLAN + "\n")).code == "not_approved"


def test_approved_source_must_run_its_approved_class(node: Node) -> None:
    node.approve()
    refused = error_of(node.train(plan_class="Other"))
    assert refused.code == "not_approved" and "'LogReg', not 'Other'" in refused.message


def test_node_without_required_approval_runs_any_plan_not_rejected(tmp_path: Path) -> None:
    node = Node(tmp_path, require_approval=False)
    reply = node.ask()
    assert isinstance(reply, TrainingPlanApproveReply) and reply.approval_required is False
    assert "does not require approval" in reply.message
    assert isinstance(node.train().content, TrainReply)
    other = PLAN + "# never asked for\n"
    assert isinstance(node.train(other).content, TrainReply)
    recorded = node.approvals.status(plan_id(other))  # recorded so that the operator can see and reject it
    assert recorded is not None and recorded.status == PENDING and "without approval" in recorded.description
    assert recorded.researcher_id == "researcher-1"
    node.approvals.reject(plan_id(PLAN))
    assert error_of(node.train()).code == "not_approved"
    node.approvals.reject(plan_id(other)[:8])
    assert error_of(node.train(other)).code == "not_approved"


# --- training ---------------------------------------------------------------------------------


def test_a_round_returns_parameters_counts_state_and_progress(node: Node) -> None:
    node.approve()
    reply_env = node.train(msg_id="train-1", training_args={"epochs": 2, "batch_size": 50, "test_ratio": 0.25,
                                                            "test_on_local_updates": True})
    reply = reply_env.content
    assert isinstance(reply, TrainReply), reply
    assert reply_env.parent_id == "train-1"
    assert (reply.experiment_id, reply.round, reply.dataset_id) == ("exp-1", 0, node.dataset.dataset_id)
    assert reply.n_samples == 150 and reply.n_test_samples == 50 and reply.n_updates == 6
    assert reply.train_loss is not None and reply.train_loss > 0
    assert set(reply.metrics_after) == {"loss"} and reply.compute_seconds > 0
    params = unpack_named(reply.params, reply_env.buffers)
    assert set(params) == {"weight", "bias"} and params["weight"].shape == (1, N_FEATURES)
    assert reply.state_id is None  # plain SGD has no moments to keep, so nothing is written
    assert node.events and all(isinstance(e.content, TrainProgress) and e.parent_id == "train-1"
                               for e in node.events)
    progress = [e.content for e in node.events if isinstance(e.content, TrainProgress)]
    assert len(progress) == len(node.events) and progress[-1].phase == "validation after"
    last = [p for p in progress if p.phase == "training"][-1]
    assert (last.experiment_id, last.round, last.n_epochs) == ("exp-1", 0, 2)
    assert last.epoch == 2 and last.iteration == last.n_iterations == 6


def test_second_round_starts_from_the_parameters_and_state_sent(node: Node) -> None:
    node.approve()
    first_env = node.train(training_args={"optimizer_args": {"momentum": 0.9}})
    first = first_env.content
    assert isinstance(first, TrainReply)
    params = {k: np.array(v) for k, v in unpack_named(first.params, first_env.buffers).items()}
    second_env = node.train(params=params, state_id=first.state_id, round=1,
                            training_args={"optimizer_args": {"momentum": 0.9}})
    second = second_env.content
    assert isinstance(second, TrainReply), second
    assert first.state_id is not None and node.dispatcher.training.states.get(first.state_id)  # the momentum
    assert second.state_id not in (None, first.state_id)
    again = node.train(params=params, state_id=first.state_id, round=1,
                       training_args={"optimizer_args": {"momentum": 0.9}})
    assert isinstance(again.content, TrainReply)
    a, b = unpack_named(second.params, second_env.buffers), unpack_named(again.content.params, again.buffers)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # same inputs, same state: bit-identical
    assert not np.array_equal(a["weight"], params["weight"])


def test_validation_only_round_keeps_the_state_and_returns_no_parameters(node: Node) -> None:
    node.approve()
    first = node.train().content
    assert isinstance(first, TrainReply)
    reply = node.train(do_training=False, state_id=first.state_id,
                       training_args={"test_ratio": 0.5}).content
    assert isinstance(reply, TrainReply), reply
    assert reply.params == [] and reply.state_id == first.state_id and set(reply.metrics_before) == {"loss"}


def test_scaffold_aux_vars_are_numbered_after_the_parameters(node: Node) -> None:
    node.approve()
    first_env = node.train()
    assert isinstance(first_env.content, TrainReply)
    params = unpack_named(first_env.content.params, first_env.buffers)
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    p_specs, p_bufs = pack_named(params)
    c_specs, c_bufs = pack_named(zeros, first_buffer=len(p_bufs))
    reply_env = node.send(TrainRequest(
        experiment_id="exp-1", round=0, dataset_id=node.dataset.dataset_id, plan_source=PLAN, plan_class="LogReg",
        params=p_specs, model_args={"n_features": N_FEATURES}, aggregator_args={"name": "scaffold"},
        aux_vars={"scaffold": c_specs}), (*p_bufs, *c_bufs))
    reply = reply_env.content
    assert isinstance(reply, TrainReply), reply
    n = len(reply.params)
    assert [s.array.buffer for s in reply.params] == list(range(n))
    assert [s.array.buffer for s in reply.aux_vars["scaffold"]] == list(range(n, 2 * n))
    deltas = unpack_named(reply.aux_vars["scaffold"], reply_env.buffers)
    assert set(deltas) == set(params) and len(reply_env.buffers) == 2 * n


def test_plan_exception_is_a_plan_error_with_the_plans_message(node: Node) -> None:
    node.approve(FAILING_PLAN)
    error = error_of(node.train(FAILING_PLAN))
    assert error.code == "plan_error"
    assert "ValueError" in error.message and "labels must be 0 or 1, got 7" in error.message
    assert isinstance(node.send(TrainingPlanStatusRequest(plan_source=PLAN, plan_class="LogReg")).content,
                      TrainingPlanStatusReply)  # the node keeps serving


def test_unknown_dataset_and_unknown_state(node: Node) -> None:
    node.approve()
    error = error_of(node.train(dataset_id="dataset-000000000000"))
    assert error.code == "dataset_error" and "dataset-000000000000" in error.message
    error = error_of(node.train(state_id="0" * 32))
    assert error.code == "plan_error" and "unknown on this node" in error.message


def test_bad_training_args_are_a_plan_error(node: Node) -> None:
    node.approve()
    error = error_of(node.train(training_args={"epoks": 1}))
    assert error.code == "plan_error" and "epoks" in error.message


def test_missing_torch_tells_the_operator_how_to_install_it(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    node.approve()
    real = handler_module.importlib.util.find_spec
    monkeypatch.setattr(handler_module, "_TORCH_FOUND", False)  # an earlier round in this process found it
    monkeypatch.setattr(handler_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    error = error_of(node.train())
    assert error.code == "config_error" and "fedlab-research[torch]" in error.message


# --- cancel -----------------------------------------------------------------------------------


def test_cancel_stops_a_running_training_at_its_next_iteration(node: Node) -> None:
    node.approve(SLOW_PLAN)
    result: list[Envelope] = []
    worker = threading.Thread(target=lambda: result.append(node.train(
        SLOW_PLAN, msg_id="long", training_args={"epochs": 100, "batch_size": 10})))
    worker.start()
    deadline = time.monotonic() + 30
    while not node.events and time.monotonic() < deadline:
        time.sleep(0.01)
    assert node.events, "the training never reported progress"
    cancelled_at = time.monotonic()
    reply = node.send(TrainCancelRequest(request_id="long")).content
    assert isinstance(reply, TrainCancelReply) and reply.cancelled is True
    worker.join(10)
    assert not worker.is_alive() and time.monotonic() - cancelled_at < 2
    error = error_of(result[0])
    assert error.code == "cancelled"
    again = node.send(TrainCancelRequest(request_id="long")).content
    assert isinstance(again, TrainCancelReply) and again.cancelled is False


def test_a_request_cancelled_while_waiting_never_starts(node: Node) -> None:
    node.approve()
    node.dispatcher.training.expect("queued")
    reply = node.send(TrainCancelRequest(request_id="queued")).content
    assert isinstance(reply, TrainCancelReply) and reply.cancelled is True
    error = error_of(node.train(msg_id="queued"))
    assert error.code == "cancelled" and "before it started" in error.message
    assert node.events == []


def test_cancel_of_unknown_request_says_so(node: Node) -> None:
    reply = node.send(TrainCancelRequest(request_id="never-sent")).content
    assert isinstance(reply, TrainCancelReply) and reply.cancelled is False


# --- loaded once, kept ------------------------------------------------------------------------


def test_plan_class_and_dataset_are_loaded_once_and_the_dataset_again_when_it_changes(node: Node) -> None:
    """The worker process keeps them; it reports what each round had to load."""
    node.approve()
    worker = node.dispatcher.training.worker
    for round_ in range(3):
        assert isinstance(node.train(round=round_).content, TrainReply)
    assert worker.loads == {"plan": 1, "dataset": 1}
    stat = os.stat(node.csv)
    os.utime(node.csv, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert isinstance(node.train().content, TrainReply)
    assert worker.loads == {"plan": 1, "dataset": 2}


def test_progress_that_cannot_be_sent_does_not_end_the_training(node: Node) -> None:
    def broken(envelope: Envelope) -> None:
        raise RuntimeError("socket gone")

    node.dispatcher.training.emit = broken
    node.approve()
    assert isinstance(node.train().content, TrainReply)


def test_warm_up_starts_one_worker_and_leaves_the_node_without_torch_state(node: Node) -> None:
    import torch

    before = torch.random.get_rng_state()
    node.dispatcher.training.warm_up()
    pid = node.dispatcher.training.worker.pid
    node.dispatcher.training.warm_up()
    assert pid is not None and pid != os.getpid() and node.dispatcher.training.worker.pid == pid
    assert torch.equal(before, torch.random.get_rng_state())
    assert node.dispatcher.training._warm is True


def test_torch_is_not_imported_until_the_first_training_request(tmp_path: Path) -> None:
    """Approval and status work on a node without torch; the first train request imports it, once."""
    code = f"""
import sys
from fedlab.node.config import init_node_dir
from fedlab.node.dispatch import Dispatcher
from fedlab.node.registry import DatasetRegistry
from fedlab.protocol import make_envelope
from fedlab.training.messages import TrainingPlanApproveRequest, TrainingPlanStatusRequest
config = init_node_dir({str(tmp_path / "n")!r}, "n")
dispatcher = Dispatcher(config.node_id, "n", DatasetRegistry(config.db_path))
for content in (TrainingPlanApproveRequest(plan_source={PLAN!r}, plan_class="LogReg"),
                TrainingPlanStatusRequest(plan_source={PLAN!r}, plan_class="LogReg")):
    reply = dispatcher.handle(make_envelope(content, "r")).content
    assert type(reply).__name__.startswith("TrainingPlan"), reply
print("torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_a_plan_that_changes_its_dataframe_leaves_the_next_round_alone(node: Node) -> None:
    popping = PLAN.replace('x = dataset.drop(columns="target").to_numpy(dtype="float32")',
                           'y = dataset.pop("target")\n        x = dataset.to_numpy(dtype="float32")',
                           ).replace('dataset["target"].to_numpy(dtype="float32")', 'y.to_numpy(dtype="float32")')
    assert "dataset.pop" in popping
    node.approve(popping)
    for round_ in range(2):
        reply = node.train(popping, round=round_).content
        assert isinstance(reply, TrainReply), reply


def test_training_threads_sets_torch_threads_in_the_worker(tmp_path: Path) -> None:
    """A node sharing a machine gives torch a fixed number of threads (config `training_threads`),
    in the worker process that trains; the worker reports the number torch took."""
    registry = DatasetRegistry(init_node_dir(tmp_path / "n", "n").db_path)
    handler = handler_module.TrainingHandler(registry, node_id="n", name="n", threads=1)
    try:
        handler.warm_up()
        ready = handler.worker.ready
        assert ready is not None and ready.threads == 1
    finally:
        handler.close()
