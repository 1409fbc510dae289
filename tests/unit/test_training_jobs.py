"""Training jobs and the Experiment against the in-memory transport twin.

The twin's "nodes" run the real training loop (``run_round``) on in-memory data, keep their
state between rounds by state_id as a node does, send progress events, and can fail, be
slow or vanish; so these tests exercise the whole researcher side (messages, buffers,
aggregation as replies arrive, history, cancel, breakpoints) in a fraction of a second.
"""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from fedlab import Experiment, FedAvg, FedlabError, FedlabNodeError, FedlabTrainingError, LocalJob, Researcher  # noqa: E402
from fedlab.protocol import DatasetInfo, DatasetSearchReply, ErrorReply, make_envelope  # noqa: E402
from fedlab.researcher.requests import MessagesByNode  # noqa: E402
from fedlab.researcher.training_jobs import TrainingJob  # noqa: E402
from fedlab.training import TorchTrainingPlan, load_plan_class, plan_id, run_round  # noqa: E402
from fedlab.training.messages import (  # noqa: E402
    TrainCancelReply,
    TrainingPlanApproveReply,
    TrainingPlanStatusReply,
    TrainProgress,
    TrainReply,
)
from fedlab.training.tensors import pack_named, unpack_named  # noqa: E402
from fedlab.transport import InMemoryResearcherTransport  # noqa: E402


class LogReg(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(model_args["n_features"], 1)

    def training_data(self, dataset):
        return dataset.drop(columns="target").to_numpy("float32"), dataset["target"].to_numpy("float32")

    def training_step(self, data, target):
        return F.binary_cross_entropy_with_logits(self.model(data).squeeze(1), target)

    def testing_step(self, data, target):
        logits = self.model(data).squeeze(1)
        return {"loss": F.binary_cross_entropy_with_logits(logits, target),
                "accuracy": ((logits > 0).float() == target).float().mean()}


def frame(n, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)) + shift
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.3 * rng.normal(size=n) > 0).astype(int)
    return pd.DataFrame(x, columns=list("abcd")).assign(target=y)


ARGS = {"epochs": 2, "batch_size": 16, "optimizer_args": {"lr": 0.1}, "test_ratio": 0.25,
        "test_on_global_updates": True, "test_on_local_updates": True}


class FakeNode:
    """A node in the twin: answers search, plan status and training with the real loop."""

    def __init__(self, node_id, data, *, fail=False, train_delay=0.0):
        self.node_id, self.data, self.fail, self.train_delay = node_id, data, fail, train_delay
        self.states, self.cancelled, self.train_requests = {}, [], []

    def reply(self, env, content, buffers=()):
        return make_envelope(content, self.node_id, parent_id=env.msg_id, buffers=buffers)

    def __call__(self, env):
        c = env.content
        if env.msg_type == "dataset_search_request":
            info = DatasetInfo(dataset_id=f"ds-{self.node_id}", name="d", tags=["t"], data_type="csv",
                               shape=list(self.data.shape), columns=list(self.data.columns),
                               dtypes={k: str(v) for k, v in self.data.dtypes.items()})
            return self.reply(env, DatasetSearchReply(datasets=[info]))
        if env.msg_type in ("training_plan_status_request", "training_plan_approve_request"):
            status = env.msg_type.startswith("training_plan_status")
            cls = TrainingPlanStatusReply if status else TrainingPlanApproveReply
            return self.reply(env, cls(plan_id=plan_id(c.plan_source), status="Approved", approval_required=False,
                                       message="ok"))
        if env.msg_type == "train_cancel_request":
            self.cancelled.append(c.request_id)
            return self.reply(env, TrainCancelReply(cancelled=True))
        assert env.msg_type == "train_request"
        self.train_requests.append(env)
        if self.fail:
            return self.reply(env, ErrorReply(code="training_error", message="plan raised ValueError",
                                              node=self.node_id))
        deadline = time.monotonic() + self.train_delay
        while time.monotonic() < deadline:  # "computing", until done or cancelled
            if env.msg_id in self.cancelled:
                return None
            time.sleep(0.01)
        events = []
        arrays, meta = self.states.get(c.state_id, ({}, {}))
        result = run_round(load_plan_class(c.plan_source, c.plan_class), self.data, round=c.round,
                           model_args=c.model_args, training_args=c.training_args,
                           params=unpack_named(c.params, env.buffers), aggregator_args=c.aggregator_args,
                           aux_vars={k: unpack_named(v, env.buffers) for k, v in c.aux_vars.items()},
                           state_arrays=arrays, state_meta=meta, do_training=c.do_training,
                           progress=lambda p: events.append(p))
        state_id = uuid.uuid4().hex
        self.states[state_id] = (result.state_arrays, result.state_meta)
        specs, buffers = pack_named(result.params)
        aux = {}
        for name, values in result.aux_vars.items():
            aux[name], more = pack_named(values, len(buffers))
            buffers += more
        progress = [self.reply(env, TrainProgress(experiment_id=c.experiment_id, round=c.round, phase=p.phase,
                                                  epoch=p.epoch, n_epochs=p.n_epochs, iteration=p.iteration,
                                                  n_iterations=p.n_iterations, loss=p.loss)) for p in events]
        reply = TrainReply(experiment_id=c.experiment_id, round=c.round, dataset_id=c.dataset_id, params=specs,
                           n_samples=result.n_samples, n_test_samples=result.n_test_samples,
                           n_updates=result.n_updates, train_loss=result.train_loss,
                           metrics_before=result.metrics_before, metrics_after=result.metrics_after, aux_vars=aux,
                           compute_seconds=result.compute_seconds, state_id=state_id)
        return [*progress, self.reply(env, reply, buffers)]


@pytest.fixture
def federation():
    made = []

    def make(*nodes):
        transport = InMemoryResearcherTransport()
        for node in nodes:
            transport.add_node(node.node_id, f"name-{node.node_id}", node)
        researcher = Researcher(transport=transport, default_timeout=10)
        made.append(researcher)
        return researcher

    yield make
    for researcher in made:
        researcher.close()


def experiment(researcher, **kw):
    options = {"model_args": {"n_features": 4}, "training_args": ARGS, "rounds": 2, "round_timeout": 10}
    return Experiment(researcher, ["t"], LogReg, **{**options, **kw})


def test_one_fedavg_round_on_one_node_equals_local_training(federation):
    data = frame(120, 0)
    exp = experiment(federation(FakeNode("a", data)), rounds=1)
    exp.run()
    local = LocalJob(data, LogReg, {"n_features": 4}, ARGS, rounds=1)
    local_params = local.run()
    for name, value in local_params.items():
        np.testing.assert_array_equal(exp.params[name], value)
    h = exp.history
    assert list(h["kind"]) == ["training", "validation"]  # test_on_global_updates: a final validation
    assert h.loc[0, "n_samples"] == 90 and h.loc[0, "n_test_samples"] == 30
    assert {"global_accuracy", "local_accuracy", "global_loss", "total_seconds", "compute_seconds"} <= set(h)
    assert h.loc[0, "total_seconds"] >= h.loc[0, "compute_seconds"] > 0
    np.testing.assert_allclose(h.loc[1, "global_loss"], local.history.loc[1, "global_loss"], rtol=1e-6)
    with torch.no_grad():
        out = exp.model()(torch.zeros(1, 4))
    assert out.shape == (1, 1)


def test_parameters_are_serialized_once_for_all_nodes():
    params = {"w": np.ones((3, 3), np.float32), "b": np.zeros(3, np.float32)}
    c = {"w": np.full((3, 3), 2, np.float32)}
    aux = {"scaffold": c}
    job = TrainingJob("exp", 1, {"a": "da", "b": "db"}, "x = 1\n", "P", params, researcher_id="r",
                      requests=None, aux_vars={"a": aux, "b": aux})  # type: ignore[arg-type]
    messages = job._messages()
    assert isinstance(messages, MessagesByNode)
    (ma, ba), (mb, bb) = messages["a"], messages["b"]
    assert len(ba) == 3 and all(x is y for x, y in zip(ba, bb, strict=True))  # the very same frames
    assert ma.dataset_id == "da" and mb.dataset_id == "db" and ma.params is mb.params
    assert ma.aux_vars["scaffold"][0].array.buffer == 2


def test_replies_are_folded_as_they_arrive_and_a_failing_node_is_left_out(federation):
    nodes = [FakeNode("a", frame(100, 1)), FakeNode("b", frame(60, 2)), FakeNode("bad", frame(50, 3), fail=True)]
    exp = experiment(federation(*nodes), rounds=1, training_args={**ARGS, "test_on_global_updates": False})
    assert len(exp.node_ids) == 3
    round_rows = exp.run_once()
    by_node = round_rows.set_index("node_id")
    assert by_node.loc["bad", "status"] == "error" and "plan raised ValueError" in by_node.loc["bad", "reason"]
    assert by_node.loc[["a", "b"], "status"].tolist() == ["ok", "ok"]
    assert exp.aggregator.added and set(exp.aggregator.added) == {"a", "b"}
    assert exp.round_current == 1 and exp.state_ids["bad"] is None and exp.state_ids["a"]


def test_every_node_failing_raises_naming_each_and_history_keeps_it(federation):
    exp = experiment(federation(FakeNode("x", frame(40, 4), fail=True), FakeNode("y", frame(40, 5), fail=True)))
    before = exp.params
    with pytest.raises(FedlabNodeError, match="every node failed round 1") as info:
        exp.run()
    assert set(info.value.errors) == {"x", "y"}
    assert exp.round_current == 0 and list(exp.history["status"]) == ["error", "error"]
    for name in before:
        np.testing.assert_array_equal(exp.params[name], before[name])


def test_a_late_node_is_missing_and_told_to_stop(federation):
    slow = FakeNode("slow", frame(40, 6), train_delay=1.5)
    exp = experiment(federation(FakeNode("fast", frame(80, 7)), slow), round_timeout=0.5, rounds=1,
                     training_args={**ARGS, "test_on_global_updates": False})
    t0 = time.monotonic()
    rows = exp.run_once().set_index("node_id")
    assert time.monotonic() - t0 < 1.4
    assert rows.loc["slow", "status"] == "missing" and rows.loc["slow", "reason"].startswith("timeout")
    assert slow.cancelled == [slow.train_requests[0].msg_id]
    assert exp.aggregator.added == ["fast"]
    time.sleep(0.05)
    assert len(slow.states) == 0  # it stopped instead of finishing the round


def test_progress_events_reach_the_listener(federation):
    seen = []
    lock = threading.Lock()

    def listener(node_id, event):
        with lock:
            seen.append((node_id, event))
    exp = experiment(federation(FakeNode("a", frame(64, 8))), rounds=1, on_progress=listener)
    exp.run_once()
    assert seen and all(n == "a" and isinstance(e, TrainProgress) for n, e in seen)
    assert {e.phase for _, e in seen} >= {"training", "validation before", "validation after"}
    assert seen[-1][1].phase == "validation after"


@pytest.mark.parametrize("aggregator", ["fedavg", "scaffold"])
def test_resuming_from_a_breakpoint_ends_where_an_uninterrupted_run_does(federation, tmp_path, aggregator):
    nodes = [FakeNode("a", frame(80, 9)), FakeNode("b", frame(50, 10, shift=0.5))]
    args = {**ARGS, "optimizer_args": {"lr": 0.1, "momentum": 0.9}} if aggregator == "fedavg" else ARGS
    full = experiment(federation(*nodes), rounds=4, aggregator=aggregator, training_args=args)
    full.run()
    first = experiment(federation(*nodes), rounds=4, aggregator=aggregator, training_args=args,
                       breakpoint_dir=tmp_path, experiment_id=full.experiment_id)
    first.run(rounds=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-0001", "round-0002"]
    resumed = Experiment.load_breakpoint(tmp_path, federation(*nodes))
    assert resumed.round_current == 2 and len(resumed.history) == 4
    resumed.run()
    for name, value in full.params.items():
        np.testing.assert_allclose(resumed.params[name], value, rtol=0, atol=1e-6)
    assert len(resumed.history) == len(full.history)
    if aggregator == "scaffold":
        assert any(np.abs(c).sum() > 0 for c in resumed.aggregator.c.values())


def test_a_resumed_experiment_keeps_its_round_timeout_and_disconnect_grace(federation, tmp_path):
    nodes = [FakeNode("a", frame(40, 17))]
    first = experiment(federation(*nodes), breakpoint_dir=tmp_path, round_timeout=7.0, disconnect_grace=3.5)
    first.run(rounds=1)
    resumed = Experiment.load_breakpoint(tmp_path, federation(*nodes))
    assert (resumed.round_timeout, resumed.disconnect_grace) == (7.0, 3.5)


def test_approve_and_check_tables_list_silent_nodes(federation):
    researcher = federation(FakeNode("a", frame(40, 11)), FakeNode("b", frame(40, 12)))
    exp = experiment(researcher)
    researcher._transport.kill("b")
    table = exp.check()
    assert list(table.columns) == ["node_id", "node", "status", "approval_required", "plan_id", "message"]
    rows = table.set_index("node_id")
    assert rows.loc["a", "status"] == "Approved" and rows.loc["a", "plan_id"] == plan_id(exp.plan_source)
    assert rows.loc["b", "status"] == "no reply" and "disconnected" in rows.loc["b", "message"]
    approved = exp.approve("a logistic regression").set_index("node_id")
    assert approved.loc["a", ["node", "status"]].tolist() == ["name-a", "Approved"]
    assert approved.loc["b", "status"] == "no reply"


def test_validation_only_requests_do_not_train(federation):
    node = FakeNode("a", frame(40, 13))
    exp = federation(node).experiment("t", LogReg, model_args={"n_features": 4}, training_args=ARGS)
    assert isinstance(exp, Experiment) and exp.rounds == 1
    rows = exp.validate()
    assert node.train_requests[-1].content.do_training is False
    assert rows.loc[0, "kind"] == "validation" and rows.loc[0, "n_updates"] == 0
    assert exp.round_current == 0


NO_VALIDATION = {**ARGS, "test_on_global_updates": False, "test_on_local_updates": False}


def test_a_node_silent_for_a_moment_stays_in_the_round(federation):
    """Heartbeats can stop for a second (torch importing on a busy node): not a reason to drop it."""
    researcher = federation(FakeNode("a", frame(40, 14), train_delay=0.6))
    exp = experiment(researcher, rounds=1, disconnect_grace=2.0, training_args=NO_VALIDATION)
    directory = researcher._transport.directory
    timers = [threading.Timer(0.1, directory.offline, args=("a",)),
              threading.Timer(0.3, directory.seen, args=("a", "name-a"))]
    for timer in timers:
        timer.start()
    rows = exp.run_once()
    assert rows["status"].tolist() == ["ok"]


def test_a_node_gone_longer_than_the_grace_is_dropped_without_waiting_for_the_timeout(federation):
    gone = FakeNode("gone", frame(40, 15), train_delay=0.5)
    researcher = federation(FakeNode("a", frame(40, 16)), gone)
    exp = experiment(researcher, rounds=1, disconnect_grace=0.3, round_timeout=30, training_args=NO_VALIDATION)
    threading.Timer(0.1, researcher._transport.kill, args=("gone",)).start()
    t0 = time.monotonic()
    rows = exp.run_once().set_index("node_id")
    assert time.monotonic() - t0 < 2
    assert rows.loc["gone", "status"] == "missing" and rows.loc["gone", "reason"].startswith("disconnected")
    assert rows.loc["a", "status"] == "ok"
    gone.cancelled.append(gone.train_requests[0].msg_id)  # let its worker thread end now


def test_a_custom_aggregator_must_be_given_again_to_resume(federation, tmp_path):
    class Halfway(FedAvg):
        """Moves the global model half way to the nodes' mean."""

        def end_round(self, n_nodes_total):
            mean = super().end_round(n_nodes_total)
            return {k: ((v + self._global[k]) / 2).astype(v.dtype) for k, v in mean.items()}

    researcher = federation(FakeNode("a", frame(40, 17)))
    exp = experiment(researcher, rounds=2, aggregator=Halfway(), breakpoint_dir=tmp_path, training_args=NO_VALIDATION)
    exp.run(rounds=1)
    with pytest.raises(FedlabError, match=r"custom aggregator .*Halfway; pass one"):
        Experiment.load_breakpoint(tmp_path, researcher)
    resumed = Experiment.load_breakpoint(tmp_path, researcher, aggregator=Halfway())
    resumed.run()
    assert resumed.round_current == 2 and isinstance(resumed.aggregator, Halfway)


def test_arguments_are_checked_before_anything_is_sent(federation):
    researcher = federation(FakeNode("a", frame(40, 18)))
    with pytest.raises(FedlabError, match="model_args must hold plain values"):
        experiment(researcher, model_args={"n_features": np.int64(4)})
    with pytest.raises(FedlabTrainingError, match="unknown training argument 'epoch'"):
        experiment(researcher, training_args={"epoch": 2})
    with pytest.raises(FedlabError, match="rounds must be a positive integer"):
        experiment(researcher, rounds=0)
    with pytest.raises(FedlabError, match="pass increase=True"):
        experiment(researcher, rounds=1, training_args=NO_VALIDATION).run(rounds=2)


def test_without_torch_the_researcher_is_told_what_to_install():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('No module named ' + repr(name))\n"
        "sys.meta_path.insert(0, Block())\n"
        "from fedlab import FedlabTrainingError, LocalJob\n"
        "import pandas as pd\n"
        "try:\n"
        "    LocalJob(pd.DataFrame({'a': [1]}), 'class P(TorchTrainingPlan):\\n    pass\\n')\n"
        "except FedlabTrainingError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "training needs torch on the researcher's side too" in out.stdout
    assert "pip install 'fedlab-research[torch]'" in out.stdout
