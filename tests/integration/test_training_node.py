"""Training on a real node (`fedlab node start`) through a real Researcher: the operator's approval
with the real `fedlab node plan` command while the node runs, plan errors, heartbeats and other
requests during a long round, progress events and cancel."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from federation import HEARTBEAT, NodeProcess, breast_cancer_splits, wait_until
from plan_sources import LOGREG_PLAN, failing, with_delay

import fedlab.training.messages  # noqa: F401  (registers the training message types on this side)
from fedlab import DiscardOnTimeout, Researcher
from fedlab.node.approvals import ApprovalRegistry
from fedlab.node.config import load_config
from fedlab.protocol import Envelope, ErrorReply, Message, PingReply, PingRequest
from fedlab.researcher.requests import FederatedRequest
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
from fedlab.training.source import plan_id
from fedlab.training.tensors import unpack_named

pytestmark = pytest.mark.integration

PLAN = LOGREG_PLAN
SLOW_PLAN = with_delay(0.02)
FAILING_PLAN = failing()


def fedlab_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedlab", *map(str, args)], capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.fixture
def federation(tmp_path: Path, address: str):
    node = NodeProcess.create(tmp_path, "hospital-a", address, frame=breast_cancer_splits(2)[0]).start()
    researcher = Researcher(address, heartbeat_interval=HEARTBEAT)
    try:
        researcher.wait_for_nodes(1, timeout=30)
        yield researcher, node
    finally:
        researcher.close()
        node.stop()


def ask(researcher: Researcher, node: NodeProcess, content: Message, timeout: float = 15.0,
        on_event=None) -> Message:
    request = researcher.requests.send(content, [node.node_id], [DiscardOnTimeout(timeout)], on_event=on_event)
    return outcome(request, node)


def outcome(request: FederatedRequest, node: NodeProcess) -> Message:
    request.wait()
    if node.node_id in request.errors():
        return request.errors()[node.node_id]
    replies = request.replies()
    assert node.node_id in replies, (request.missing(), node.log()[-2000:])
    return replies[node.node_id].content


def train_request(node: NodeProcess, source: str = PLAN, **training_args: object) -> TrainRequest:
    dataset_id = next(iter(_datasets(node)))
    return TrainRequest(experiment_id="exp-1", round=0, dataset_id=dataset_id, plan_source=source,
                        plan_class="LogReg", params=[], model_args={"n_features": 30},
                        training_args={"epochs": 1, "batch_size": 32, **training_args})


def _datasets(node: NodeProcess) -> list[str]:
    from fedlab.node.registry import DatasetRegistry

    return [r.dataset_id for r in DatasetRegistry(load_config(node.directory).db_path).list()]


def approve_in_process(node: NodeProcess, source: str) -> None:
    """What `fedlab node plan approve` does, without the subprocess (tests other than the CLI flow)."""
    registry = ApprovalRegistry(load_config(node.directory).db_path)
    registry.request(source, "LogReg")
    registry.approve(plan_id(source))


def test_operator_approves_and_rejects_with_the_cli_while_the_node_runs(federation):
    researcher, node = federation
    pid, short = plan_id(PLAN), plan_id(PLAN)[:12]

    status = ask(researcher, node, TrainingPlanStatusRequest(plan_source=PLAN, plan_class="LogReg"))
    assert isinstance(status, TrainingPlanStatusReply) and status.status == NOT_REGISTERED
    assert status.plan_id == pid and status.approval_required is True

    reply = ask(researcher, node, TrainingPlanApproveRequest(plan_source=PLAN, plan_class="LogReg",
                                                             description="logistic regression"))
    assert isinstance(reply, TrainingPlanApproveReply) and reply.status == PENDING
    assert f"fedlab node plan approve {node.directory.resolve()} {short}" in reply.message

    # the first training message warms torch up on the training thread, before any round needs it
    wait_until(lambda: "loaded for training" in node.log(), 30, "the node to load torch")

    listing = fedlab_cli("node", "plan", "list", node.directory)
    assert listing.returncode == 0, listing.stderr
    assert short in listing.stdout and "Pending" in listing.stdout and "logistic regression" in listing.stdout

    refused = ask(researcher, node, train_request(node))
    assert isinstance(refused, ErrorReply) and refused.code == "not_approved"
    assert pid in refused.message and PENDING in refused.message
    # an error reply never names the node's directory (fedlab.node.safe_errors)
    assert f"fedlab node plan approve <path on the node> {short}" in refused.message

    shown = fedlab_cli("node", "plan", "show", node.directory, short)
    assert shown.returncode == 0 and "class LogReg(TorchTrainingPlan):" in shown.stdout and pid in shown.stdout

    approved = fedlab_cli("node", "plan", "approve", node.directory, pid[:8], "--note", "read it")
    assert approved.returncode == 0, approved.stderr
    trained = researcher.requests.send(train_request(node), [node.node_id], [DiscardOnTimeout(15)]).wait()
    assert node.node_id in trained.replies(), (trained.errors(), trained.missing())
    envelope = trained.replies()[node.node_id]
    result = envelope.content
    assert isinstance(result, TrainReply)
    assert result.n_samples == len(breast_cancer_splits(2)[0]) and result.n_updates > 0
    params = unpack_named(result.params, envelope.buffers)
    assert params["weight"].shape == (1, 30) and np.isfinite(params["weight"]).all()

    rejected = fedlab_cli("node", "plan", "reject", node.directory, short, "--note", "too slow")
    assert rejected.returncode == 0, rejected.stderr
    refused = ask(researcher, node, train_request(node))
    assert isinstance(refused, ErrorReply) and refused.code == "not_approved"
    assert "Rejected" in refused.message and "too slow" in refused.message

    changed = ask(researcher, node, TrainingPlanStatusRequest(plan_source=PLAN.replace("0.0", "0.00"),
                                                              plan_class="LogReg"))
    assert isinstance(changed, TrainingPlanStatusReply) and changed.status == NOT_REGISTERED

    unknown = fedlab_cli("node", "plan", "approve", node.directory, "0123abcd")
    assert unknown.returncode == 2 and unknown.stderr.startswith("fedlab: error: no training plan 0123abcd")
    assert "Traceback" not in unknown.stderr


def test_a_dataset_removed_with_the_cli_while_the_node_runs_is_refused_at_once(federation):
    """The node's threads keep node.db open between requests (fedlab.node.db_connections): the removal
    by another process must still be seen by the very next request, and by every one after it."""
    researcher, node = federation
    approve_in_process(node, PLAN)
    request = train_request(node)
    for _ in range(3):  # the training thread's connection is opened, then reused
        assert isinstance(ask(researcher, node, request), TrainReply)
    removed = fedlab_cli("node", "dataset", "remove", node.directory, request.dataset_id)
    assert removed.returncode == 0, removed.stderr
    for round_ in range(3):
        refused = ask(researcher, node, TrainRequest(**{**{f: getattr(request, f) for f in request.__struct_fields__},
                                                       "round": round_}))
        assert isinstance(refused, ErrorReply), refused
        assert refused.code == "dataset_error" and f"no dataset named {request.dataset_id!r}" in refused.message, \
            refused


def test_plan_error_comes_back_with_the_plans_message_and_the_node_keeps_serving(federation):
    researcher, node = federation
    approve_in_process(node, FAILING_PLAN)
    error = ask(researcher, node, train_request(node, FAILING_PLAN))
    assert isinstance(error, ErrorReply) and error.code == "plan_error", error
    assert "ValueError: labels must be 0 or 1, got 7" in error.message and "training_step" in error.message
    assert isinstance(ask(researcher, node, PingRequest()), PingReply)


def test_heartbeats_pings_and_progress_flow_during_a_long_training(federation):
    researcher, node = federation
    approve_in_process(node, SLOW_PLAN)
    events: list[Envelope] = []
    # 189 samples / batch 16 = 12 iterations per epoch, ~0.02 s each: about 3 s of training
    request = researcher.requests.send(train_request(node, SLOW_PLAN, epochs=12, batch_size=16, progress_interval=0.1),
                                       [node.node_id], [DiscardOnTimeout(30)],
                                       on_event=lambda node_id, env: events.append(env))
    done = threading.Event()
    outcomes: list[Message] = []
    waiter = threading.Thread(target=lambda: (outcomes.append(outcome(request, node)), done.set()))
    statuses: set[str] = set()
    ping_times: list[float] = []
    started = time.monotonic()
    waiter.start()
    while not done.wait(0.1):
        statuses.add(researcher.nodes().iloc[0]["status"])
        t0 = time.monotonic()
        assert researcher.ping([node.node_id], timeout=5).replies(), "a ping went unanswered during training"
        ping_times.append(time.monotonic() - t0)
    waiter.join(5)
    result = outcomes[0]
    elapsed = time.monotonic() - started
    assert isinstance(result, TrainReply), result
    assert elapsed > 2, "the training was meant to be long enough to watch"
    assert "offline" not in statuses and "busy" in statuses
    assert len(ping_times) >= 5 and max(ping_times) < 1.0
    progress = [e.content for e in events]
    assert len(progress) >= 5 and all(isinstance(p, TrainProgress) for p in progress)
    assert all(e.parent_id == request.msg_ids[node.node_id] for e in events)
    assert progress[-1].epoch == progress[-1].n_epochs == 12 and progress[-1].experiment_id == "exp-1"


def test_cancel_stops_a_long_training_quickly(federation):
    researcher, node = federation
    approve_in_process(node, SLOW_PLAN)
    first_event = threading.Event()
    request = researcher.requests.send(train_request(node, SLOW_PLAN, epochs=1000, batch_size=16),
                                       [node.node_id], [DiscardOnTimeout(60)],
                                       on_event=lambda node_id, env: first_event.set())
    assert first_event.wait(30), node.log()[-2000:]
    cancelled_at = time.monotonic()
    reply = ask(researcher, node, TrainCancelRequest(request_id=request.msg_ids[node.node_id]))
    assert isinstance(reply, TrainCancelReply) and reply.cancelled is True
    error = outcome(request, node)
    assert isinstance(error, ErrorReply) and error.code == "cancelled", error
    assert time.monotonic() - cancelled_at < 2
    again = ask(researcher, node, TrainCancelRequest(request_id=request.msg_ids[node.node_id]))
    assert isinstance(again, TrainCancelReply) and again.cancelled is False
    wait_until(lambda: researcher.nodes().iloc[0]["status"] == "online", 5, "the node to be idle again")
    assert isinstance(ask(researcher, node, PingRequest()), PingReply)
