"""Plan safety on a real node (`fedlab node start`) through a real Researcher: plans run in the node's
training worker process, which the node kills when a round passes `training_timeout`, when a cancel is
ignored, and which it replaces when something else kills it; a plan cannot use fedlab's node API; a plan
one byte away from the approved one is refused."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from federation import HEARTBEAT, NodeProcess, breast_cancer_splits
from plan_sources import LOGREG_PLAN

import fedlab.training.messages  # noqa: F401  (registers the training message types on this side)
from fedlab import DiscardOnTimeout, Researcher
from fedlab.node.approvals import ApprovalRegistry
from fedlab.node.config import CONFIG_FILE, load_config
from fedlab.node.registry import DatasetRegistry
from fedlab.protocol import ErrorReply, Message, PingReply, PingRequest
from fedlab.training.messages import TrainCancelReply, TrainCancelRequest, TrainReply, TrainRequest
from fedlab.training.source import plan_id

pytestmark = pytest.mark.integration

PLAN = LOGREG_PLAN
STEP = "    def training_step(self, data, target):\n"
BUSY_PLAN = PLAN.replace(STEP, STEP + "        while True:\n            pass\n")
SLEEPING_PLAN = PLAN.replace("import numpy as np\n", "import time\nimport numpy as np\n").replace(
    STEP, STEP + "        time.sleep(10**6)\n")
SLOW_PLAN = PLAN.replace("import numpy as np\n", "import time\nimport numpy as np\n").replace(
    STEP, STEP + "        time.sleep(0.02)\n")
STUCK_AFTER_ONE_STEP_PLAN = PLAN.replace("import numpy as np\n", "import time\nimport numpy as np\n").replace(
    STEP, "    steps = 0\n\n" + STEP + "        type(self).steps += 1\n        if self.steps > 1:\n"
    "            time.sleep(10**6)\n")
READS_CONFIG_PLAN = PLAN.replace(  # imports the node's API inside a method, to read its config and database
    "        x = dataset.drop", "        import fedlab.node.config\n        fedlab.node.config.load_config('..')\n"
    "        x = dataset.drop")
READS_REGISTRY_PLAN = PLAN.replace("from fedlab.training import TorchTrainingPlan\n",
                                   "from fedlab.training import TorchTrainingPlan\n"
                                   "from fedlab.node.registry import DatasetRegistry\n")
LOOKS_AROUND_PLAN = PLAN.replace("import numpy as np\n", "import os, sys\nimport numpy as np\n").replace(
    "        x = dataset.drop",
    "        node_modules = sorted(m for m in sys.modules if m.split('.')[0] == 'zmq' or m.startswith(\n"
    "            ('fedlab.node', 'fedlab.transport', 'fedlab.researcher', 'fedlab.cli')))\n"
    "        raise RuntimeError(f'cwd={os.getcwd()} node.db={os.path.exists(\"node.db\")} '\n"
    "                           f'config={os.path.exists(\"config.toml\")} modules={node_modules}')\n"
    "        x = dataset.drop")


def start_node(root: Path, address: str, *, training_timeout: float) -> NodeProcess:
    node = NodeProcess.create(root, "hospital-a", address, frame=breast_cancer_splits(2)[0])
    config = node.directory / CONFIG_FILE
    text = config.read_text()
    assert "\ntraining_timeout = 3600.0\n" in text  # `fedlab node init` writes the default, with a comment
    config.write_text(text.replace("\ntraining_timeout = 3600.0\n", f"\ntraining_timeout = {training_timeout}\n"))
    assert load_config(node.directory).training_timeout == training_timeout
    return node.start()


@pytest.fixture
def connect(tmp_path: Path, address: str):
    started: list[tuple[Researcher, NodeProcess]] = []

    def make(training_timeout: float = 3600.0) -> tuple[Researcher, NodeProcess]:
        node = start_node(tmp_path, address, training_timeout=training_timeout)
        researcher = Researcher(address, heartbeat_interval=HEARTBEAT)
        started.append((researcher, node))
        researcher.wait_for_nodes(1, timeout=30)
        return researcher, node

    yield make
    for researcher, node in started:
        researcher.close()
        node.stop()


def ask(researcher: Researcher, node: NodeProcess, content: Message, timeout: float = 60.0, on_event=None
        ) -> Message:
    request = researcher.requests.send(content, [node.node_id], [DiscardOnTimeout(timeout)], on_event=on_event)
    request.wait()
    if node.node_id in request.errors():
        return request.errors()[node.node_id]
    assert node.node_id in request.replies(), (request.missing(), node.log()[-3000:])
    return request.replies()[node.node_id].content


def approve(node: NodeProcess, source: str) -> str:
    registry = ApprovalRegistry(load_config(node.directory).db_path)
    registry.request(source, "LogReg")
    return registry.approve(plan_id(source)).plan_id


def train(node: NodeProcess, source: str = PLAN, **training_args: object) -> TrainRequest:
    (record,) = DatasetRegistry(load_config(node.directory).db_path).list()
    return TrainRequest(experiment_id="exp-1", round=0, dataset_id=record.dataset_id, plan_source=source,
                        plan_class="LogReg", params=[], model_args={"n_features": 30},
                        training_args={"epochs": 1, "batch_size": 32, **training_args})


def worker_pids(node: NodeProcess) -> list[int]:
    return [int(pid) for pid in re.findall(r"in training worker process (\d+)", node.log())]


def test_a_hanging_plan_is_stopped_at_training_timeout_and_the_node_keeps_serving(connect):
    researcher, node = connect(training_timeout=6.0)
    for source in (BUSY_PLAN, SLEEPING_PLAN):
        pid = approve(node, source)
        error = ask(researcher, node, train(node, source))
        assert isinstance(error, ErrorReply) and error.code == "plan_error", error
        assert pid[:12] in error.message and "training_timeout of 6 s" in error.message, error.message
        assert "raise training_timeout" in error.message  # what to do
        assert isinstance(ask(researcher, node, PingRequest(), timeout=10), PingReply)
    approve(node, PLAN)
    reply = ask(researcher, node, train(node))
    assert isinstance(reply, TrainReply), reply
    assert reply.n_samples == len(breast_cancer_splits(2)[0]) and reply.n_updates > 0
    assert len(set(worker_pids(node))) == 3  # a fresh worker after each kill


def test_a_plan_cannot_import_the_nodes_api_nor_sees_the_node_directory(connect):
    researcher, node = connect()
    # `from fedlab.node.registry import ...` is refused at its first step, fedlab.node
    for source, module in ((READS_CONFIG_PLAN, "fedlab.node"), (READS_REGISTRY_PLAN, "fedlab.node")):
        approve(node, source)
        error = ask(researcher, node, train(node, source))
        assert isinstance(error, ErrorReply) and error.code == "plan_error", error
        assert f"training plans cannot import {module}" in error.message, error.message
        assert "plan line" in error.message  # the plan's own line that tried
    approve(node, LOOKS_AROUND_PLAN)
    error = ask(researcher, node, train(node, LOOKS_AROUND_PLAN))
    assert isinstance(error, ErrorReply) and error.code == "plan_error", error
    cwd = re.search(r"cwd=(\S+)", error.message)
    assert cwd is not None, error.message
    assert Path(cwd.group(1)).resolve() != node.directory.resolve()
    assert "fedlab-plan-" in cwd.group(1)
    assert "node.db=False config=False modules=[]" in error.message, error.message
    approve(node, PLAN)
    reply = ask(researcher, node, train(node))
    assert isinstance(reply, TrainReply), reply  # the worker that refused the imports still trains


def test_a_plan_one_byte_away_from_the_approved_one_is_refused(connect):
    researcher, node = connect()
    approve(node, PLAN)
    changed = PLAN.replace("+ 1e-6", "+ 1e-7")
    assert len(changed) == len(PLAN) and sum(a != b for a, b in zip(PLAN, changed, strict=True)) == 1
    error = ask(researcher, node, train(node, changed))
    assert isinstance(error, ErrorReply) and error.code == "not_approved", error
    assert plan_id(changed) in error.message
    assert isinstance(ask(researcher, node, train(node)), TrainReply)  # the approved one runs


def test_a_worker_killed_from_outside_fails_its_round_and_the_next_round_works(connect):
    researcher, node = connect()
    approve(node, SLOW_PLAN)
    approve(node, PLAN)
    progress = threading.Event()
    request = researcher.requests.send(train(node, SLOW_PLAN, epochs=1000, batch_size=16), [node.node_id],
                                       [DiscardOnTimeout(60)], on_event=lambda node_id, env: progress.set())
    assert progress.wait(60), node.log()[-3000:]
    (pid,) = worker_pids(node)
    os.kill(pid, signal.SIGKILL)
    request.wait()
    error = request.errors().get(node.node_id)
    assert isinstance(error, ErrorReply) and error.code == "plan_error", (error, request.missing())
    assert "was killed by signal SIGKILL" in error.message and "next one starts a fresh worker" in error.message
    reply = ask(researcher, node, train(node))
    assert isinstance(reply, TrainReply), reply
    assert len(set(worker_pids(node))) == 2 and pid not in worker_pids(node)[1:]


def test_cancel_kills_a_plan_that_does_not_stop(connect):
    researcher, node = connect()
    approve(node, STUCK_AFTER_ONE_STEP_PLAN)
    approve(node, PLAN)
    progress = threading.Event()  # after the first step: the plan is then stuck in its second
    request = researcher.requests.send(train(node, STUCK_AFTER_ONE_STEP_PLAN), [node.node_id],
                                       [DiscardOnTimeout(60)], on_event=lambda node_id, env: progress.set())
    assert progress.wait(60), node.log()[-3000:]
    time.sleep(0.5)  # the plan is now well inside its second step
    reply = ask(researcher, node, TrainCancelRequest(request_id=request.msg_ids[node.node_id]), timeout=10)
    assert isinstance(reply, TrainCancelReply) and reply.cancelled is True
    request.wait()
    error = request.errors().get(node.node_id)
    assert isinstance(error, ErrorReply) and error.code == "cancelled", (error, request.missing())
    assert "the plan did not stop within 5 s, so its worker process was stopped" in error.message, error.message
    assert isinstance(ask(researcher, node, train(node)), TrainReply)
    assert len(set(worker_pids(node))) == 2
