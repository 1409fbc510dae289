"""Federated training through real `fedlab node start` processes: what the researcher sees.

One node and FedAvg equals local training; three label-skewed nodes reach pooled training's
accuracy on a common held-out set; a run resumed from a breakpoint by a new Experiment and a
new Researcher ends where an uninterrupted run does; FedProx and Scaffold learn; a failing or
stopped node is reported and the round goes on; image folders train; progress arrives.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from federation import HEARTBEAT, NodeProcess

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from fedlab import Experiment, LocalJob, Researcher, TorchTrainingPlan  # noqa: E402
from fedlab.node.registry import DatasetRegistry  # noqa: E402

pytestmark = pytest.mark.integration

# A node's first round imports torch, which can starve its heartbeats on a busy 2-core machine;
# the experiment tolerates that (disconnect_grace), and a 0.5 s heartbeat keeps it from flapping.
NODE_HEARTBEAT = 0.5
ARGS = {"epochs": 1, "batch_size": 32, "optimizer_args": {"lr": 0.1}, "seed": 3}


class CancerLogReg(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(model_args["n_features"], 1)

    def training_data(self, dataset):
        y = dataset["target"].to_numpy()
        if not set(np.unique(y)) <= {0, 1}:
            raise ValueError(f"labels must be 0 or 1, got {sorted(set(np.unique(y)) - {0, 1})}")
        return dataset.drop(columns="target").to_numpy("float32"), y.astype("float32")

    def training_step(self, data, target):
        return F.binary_cross_entropy_with_logits(self.model(data).squeeze(1), target)

    def testing_step(self, data, target):
        logits = self.model(data).squeeze(1)
        return {"loss": F.binary_cross_entropy_with_logits(logits, target),
                "accuracy": ((logits > 0).float() == target).float().mean()}


class DigitsPlan(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(64, 10)

    def training_data(self, dataset):
        images, labels = dataset.arrays()
        return images.reshape(len(images), -1).astype("float32") / 255.0, labels

    def training_step(self, data, target):
        return F.cross_entropy(self.model(data), target)


@pytest.fixture(autouse=True)
def one_thread_per_node(monkeypatch):
    """Node processes inherit this: one torch thread each, so three nodes share 2 cores calmly."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def cancer_data(seed: int = 0):
    """Breast cancer, 20% held out (stratified), the rest standardized with the pooled training
    rows' statistics (what federated statistics give) and split label-skewed over 3 sites."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    frame = load_breast_cancer(as_frame=True).frame
    pool, test = train_test_split(frame, test_size=0.2, stratify=frame["target"], random_state=seed)
    features = [c for c in frame.columns if c != "target"]
    mean, std = pool[features].mean(), pool[features].std()
    pool, test = pool.copy(), test.copy()
    pool[features] = (pool[features] - mean) / std
    test[features] = (test[features] - mean) / std
    rng = np.random.default_rng(seed)
    shares = {0: [0.6, 0.1, 0.3], 1: [0.15, 0.7, 0.15]}  # malignant mostly at a, benign mostly at b
    parts: list[list[pd.DataFrame]] = [[], [], []]
    for label, share in shares.items():
        rows = pool[pool["target"] == label].sample(frac=1.0, random_state=int(rng.integers(1 << 30)))
        cuts = [0, *np.cumsum([int(round(s * len(rows))) for s in share[:-1]]), len(rows)]
        for i in range(3):
            parts[i].append(rows.iloc[cuts[i]:cuts[i + 1]])
    sites = [pd.concat(p).sample(frac=1.0, random_state=seed).reset_index(drop=True) for p in parts]
    return sites, pool.reset_index(drop=True), test.reset_index(drop=True)


def no_approval(node: NodeProcess) -> NodeProcess:
    path = node.directory / "config.toml"
    path.write_text(path.read_text().replace("require_approval = true", "require_approval = false"))
    return node


def start(tmp_path: Path, address: str, frames, *, approval: bool = False, tags=("cancer",)):
    nodes = []
    for i, frame in enumerate(frames):
        node = NodeProcess.create(tmp_path, f"site-{chr(97 + i)}", address, frame=frame, tags=tags,
                                  heartbeat=NODE_HEARTBEAT)
        nodes.append((node if approval else no_approval(node)).start())
    researcher = Researcher(address, heartbeat_interval=HEARTBEAT)
    researcher.wait_for_nodes(len(nodes), timeout=30)
    return researcher, nodes


@pytest.fixture
def cleanup():
    """Stop what a test started, in any case."""
    things: list = []
    yield things
    for thing in things:
        if isinstance(thing, Researcher):
            thing.close()
        elif thing.proc is not None and thing.proc.poll() is None:
            thing.proc.terminate()  # all at once: each takes a moment to shut down
    for thing in things:
        if isinstance(thing, NodeProcess):
            thing.stop()


def accuracy(module, test: pd.DataFrame) -> float:
    with torch.no_grad():
        logits = module(torch.tensor(test.drop(columns="target").to_numpy("float32"))).squeeze(1)
    return float(((logits > 0).numpy() == test["target"].to_numpy()).mean())


def test_one_node_fedavg_round_equals_local_training_after_cli_approval(tmp_path, address, cleanup):
    sites, _, _ = cancer_data()
    researcher, nodes = start(tmp_path, address, sites[:1], approval=True)
    cleanup += [researcher, *nodes]
    events = []
    lock = threading.Lock()

    def on_progress(node_id, event):
        with lock:
            events.append((node_id, event))
    args = {**ARGS, "epochs": 2, "test_ratio": 0.2, "test_on_global_updates": True, "progress_interval": 0.0}
    exp = Experiment(researcher, ["cancer"], CancerLogReg, model_args={"n_features": 30}, training_args=args,
                     rounds=1, round_timeout=60, on_progress=on_progress)
    asked = exp.approve("logistic regression on tumour features")
    assert asked.loc[0, "status"] == "Pending" and asked.loc[0, "approval_required"]
    plan_id = asked.loc[0, "plan_id"]
    cli = subprocess.run([sys.executable, "-m", "fedlab", "node", "plan", "approve", str(nodes[0].directory),
                          plan_id], capture_output=True, text=True, timeout=60, check=False)
    assert cli.returncode == 0, cli.stderr
    assert exp.check().loc[0, ["status", "plan_id"]].tolist() == ["Approved", plan_id]

    history = exp.run()
    assert history["status"].tolist() == ["ok", "ok"] and history["kind"].tolist() == ["training", "validation"]
    local = LocalJob(tmp_path / "site-a.csv", CancerLogReg, {"n_features": 30}, args, rounds=1)
    for name, value in local.run().items():
        np.testing.assert_allclose(exp.params[name], value, rtol=0, atol=1e-6)
    assert history.loc[0, "n_samples"] == local.history.loc[0, "n_samples"]
    assert history.loc[0, "train_loss"] == pytest.approx(local.history.loc[0, "train_loss"], abs=1e-6)
    assert history.loc[1, "global_accuracy"] == pytest.approx(local.history.loc[1, "global_accuracy"], abs=1e-6)
    node_id = nodes[0].node_id
    phases = {e.phase for n, e in events if n == node_id}
    assert {"validation before", "training"} <= phases  # progress from the node reached the listener
    assert any(e.phase == "training" and e.iteration == e.n_iterations for _, e in events)


def test_fedavg_over_three_label_skewed_nodes_matches_pooled_training(tmp_path, address, cleanup):
    sites, pool, test = cancer_data()
    researcher, nodes = start(tmp_path, address, sites)
    cleanup += [researcher, *nodes]
    pooled = LocalJob(pool, CancerLogReg, {"n_features": 30}, ARGS, rounds=20)
    pooled.run()
    target = accuracy(pooled.model(), test)
    exp = Experiment(researcher, ["cancer"], CancerLogReg, model_args={"n_features": 30}, training_args=ARGS,
                     rounds=20, round_timeout=30)
    reached = []
    for _ in range(20):  # 20 rounds of one local epoch, as the pooled run had 20 epochs
        exp.run_once()
        reached.append(accuracy(exp.model(), test))
    print(f"\npooled accuracy {target:.4f}; federated accuracy by round {[round(a, 4) for a in reached]}")
    assert max(reached) >= target - 0.02 and reached[-1] >= target - 0.02, (target, reached)
    sizes = exp.history.groupby("node_id")["n_samples"].first()
    assert sorted(sizes) == sorted(len(s) for s in sites) and (exp.history["status"] == "ok").all()


@pytest.mark.parametrize("aggregator, optimizer_args", [("fedavg", {"lr": 0.05, "momentum": 0.9}),
                                                        ("scaffold", {"lr": 0.05})])
def test_a_run_resumed_from_its_breakpoint_ends_like_an_uninterrupted_one(
        tmp_path, address, cleanup, aggregator, optimizer_args):
    sites, _, _ = cancer_data()
    researcher, nodes = start(tmp_path, address, sites[:2])
    cleanup += nodes
    options = {"model_args": {"n_features": 30}, "training_args": {**ARGS, "optimizer_args": optimizer_args},
               "rounds": 4, "aggregator": aggregator, "round_timeout": 30}
    with researcher:
        full = Experiment(researcher, ["cancer"], CancerLogReg, **options)
        full.run()
        interrupted = Experiment(researcher, ["cancer"], CancerLogReg, breakpoint_dir=tmp_path / "bp", **options)
        interrupted.run(rounds=2)
    del interrupted  # the notebook is gone; only the breakpoint and the nodes remain
    with Researcher(address, heartbeat_interval=HEARTBEAT) as again:
        again.wait_for_nodes(2, timeout=30)
        resumed = Experiment.load_breakpoint(tmp_path / "bp", again)
        assert resumed.round_current == 2
        resumed.run()
    for name, value in full.params.items():
        np.testing.assert_allclose(resumed.params[name], value, rtol=0, atol=1e-6)
    assert resumed.history["round"].tolist() == full.history["round"].tolist()


@pytest.mark.parametrize("aggregator, aggregator_args", [("fedprox", {"mu": 0.1}), ("scaffold", {"server_lr": 1.0})])
def test_fedprox_and_scaffold_learn_on_real_nodes(tmp_path, address, cleanup, aggregator, aggregator_args):
    sites, _, test = cancer_data()
    researcher, nodes = start(tmp_path, address, sites[:2])  # the two most label-skewed sites
    cleanup += [researcher, *nodes]
    args = {**ARGS, "optimizer_args": {"lr": 0.05}, "test_ratio": 0.2, "test_on_global_updates": True}
    exp = Experiment(researcher, ["cancer"], CancerLogReg, model_args={"n_features": 30}, training_args=args,
                     rounds=5, aggregator=aggregator, aggregator_args=aggregator_args, round_timeout=30)
    start_accuracy = accuracy(exp.model(), test)
    history = exp.run()
    assert (history["status"] == "ok").all()
    first, last = history[history["round"] == 1], history[history["kind"] == "validation"]
    assert len(last) == 2
    weighted = [np.average(h["global_loss"], weights=h["n_test_samples"]) for h in (first, last)]
    assert weighted[1] < 0.5 * weighted[0], weighted
    assert accuracy(exp.model(), test) > max(start_accuracy, 0.9)
    if aggregator == "scaffold":
        assert any(np.abs(c).sum() > 0 for c in exp.aggregator.c.values())


def test_failing_and_stopped_nodes_are_reported_and_the_rounds_go_on(tmp_path, address, cleanup):
    sites, _, _ = cancer_data()
    bad = sites[2].copy()
    bad.loc[:5, "target"] = 7  # the plan refuses these labels
    researcher, nodes = start(tmp_path, address, [sites[0], sites[1], bad])
    cleanup += [researcher, *nodes]
    exp = Experiment(researcher, ["cancer"], CancerLogReg, model_args={"n_features": 30}, training_args=ARGS,
                     rounds=2, round_timeout=60)
    first = exp.run_once().set_index("node_id")  # the nodes' first round imports torch: slow
    exp.round_timeout = 3.0
    a, b, c = (n.node_id for n in nodes)
    assert first.loc[[a, b], "status"].tolist() == ["ok", "ok"]
    assert first.loc[c, "status"] == "error"
    assert "ValueError" in first.loc[c, "reason"] and "labels must be 0 or 1" in first.loc[c, "reason"]
    nodes[1].stop()
    second = exp.run_once().set_index("node_id")
    assert second.loc[a, "status"] == "ok" and second.loc[c, "status"] == "error"
    assert second.loc[b, "status"] == "missing" and second.loc[b, "reason"].split(":")[0] in ("timeout",
                                                                                               "disconnected")
    assert exp.round_current == 2 and exp.aggregator.added == [a]


def test_an_image_folder_trains_one_round(tmp_path, address, cleanup):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path / "digits"
    for i, (image, label) in enumerate(zip(digits.images[:400], digits.target[:400], strict=True)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8), mode="L").save(root / str(label) / f"{i}.png")
    node = no_approval(NodeProcess.create(tmp_path, "imaging", address, heartbeat=NODE_HEARTBEAT))
    DatasetRegistry(node.directory / "node.db").add("digits", ["digits"], "images", str(root))
    cleanup.append(node.start())
    with Researcher(address, heartbeat_interval=HEARTBEAT) as researcher:
        researcher.wait_for_nodes(1, timeout=30)
        exp = Experiment(researcher, ["digits"], DigitsPlan, training_args={**ARGS, "epochs": 3}, rounds=1,
                         round_timeout=60)
        before = exp.params["weight"].copy()
        history = exp.run()
    assert history.loc[0, "status"] == "ok" and history.loc[0, "n_samples"] == 400
    assert np.isfinite(history.loc[0, "train_loss"]) and not np.array_equal(exp.params["weight"], before)
    images = np.stack([np.asarray(Image.open(root / str(t) / f"{i}.png")) for i, t in enumerate(digits.target[:400])])
    with torch.no_grad():
        predicted = exp.model()(torch.tensor(images.reshape(400, -1) / 255.0, dtype=torch.float32)).argmax(1)
    assert float((predicted.numpy() == digits.target[:400]).mean()) > 0.5
