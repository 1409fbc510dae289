"""Devices on real `fedlab node start` processes: the node's ``device`` setting against ``use_gpu``.

Three nodes: one set to ``device = "cpu"``, one left at ``"auto"``, one set to ``"cuda"``. A researcher who
asks ``use_gpu=True`` sees in the history where each node trained and, where that is not a GPU, the node's
note saying why; a node whose operator demands a GPU its torch does not see fails the round with an error
for its operator. On a machine with a CUDA GPU the same experiment trains on it (the last test, a real GPU
round compared with the CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from federation import HEARTBEAT, NodeProcess, breast_cancer_splits, wait_until

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from fedlab import Experiment, LocalJob, Researcher, TorchTrainingPlan  # noqa: E402

pytestmark = pytest.mark.integration

NODE_HEARTBEAT = 0.5  # a node's first round imports torch: see test_training
HAS_CUDA = torch.cuda.is_available()
ARGS: dict[str, Any] = {"epochs": 1, "batch_size": 32, "optimizer_args": {"lr": 0.1}, "seed": 3}


class ScaledLogReg(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(model_args["n_features"], 1)

    def training_data(self, dataset):
        x = dataset.drop(columns="target").to_numpy("float32")
        return (x - x.mean(axis=0)) / x.std(axis=0), dataset["target"].to_numpy("float32")

    def training_step(self, data, target):
        return F.binary_cross_entropy_with_logits(self.model(data).squeeze(1), target)


@pytest.fixture(autouse=True)
def one_thread_per_node(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _node(root: Path, address: str, name: str, frame, device: str | None) -> NodeProcess:
    node = NodeProcess.create(root, name, address, frame=frame, tags=("cancer",), heartbeat=NODE_HEARTBEAT)
    path = node.directory / "config.toml"
    text = path.read_text().replace("require_approval = true", "require_approval = false")
    if device is not None:
        assert 'device = "auto"' in text  # what `fedlab node init` writes
        text = text.replace('device = "auto"', f'device = "{device}"')
    path.write_text(text)
    return node


@pytest.fixture
def federation(tmp_path, address):
    """Nodes set to "cpu", left at "auto" and set to "cuda", started, and a researcher that sees them."""
    frames = breast_cancer_splits(3)
    nodes = [_node(tmp_path, address, "site-cpu", frames[0], "cpu"),
             _node(tmp_path, address, "site-auto", frames[1], None),
             _node(tmp_path, address, "site-cuda", frames[2], "cuda")]
    for node in nodes:
        node.start()
    researcher = Researcher(address, heartbeat_interval=HEARTBEAT)
    try:
        researcher.wait_for_nodes(3, timeout=30)
        yield researcher, {node.directory.name: node for node in nodes}
    finally:
        researcher.close()
        for node in nodes:
            node.stop()


def test_use_gpu_trains_where_each_node_allows_and_the_history_says_why(federation) -> None:
    researcher, nodes = federation
    ids = {name: node.node_id for name, node in nodes.items()}
    asked = Experiment(researcher, ["cancer"], ScaledLogReg, model_args={"n_features": 30},
                       training_args={**ARGS, "use_gpu": True}, rounds=1, round_timeout=90)
    history = asked.run().set_index("node_id")
    cpu, auto, forced = history.loc[ids["site-cpu"]], history.loc[ids["site-auto"]], history.loc[ids["site-cuda"]]

    assert cpu["status"] == "ok" and cpu["device"] == "cpu"
    assert cpu["device_note"] == ('use_gpu: node site-cpu trains on the CPU only (its operator set device = "cpu"); '
                                  "this round trained on the CPU")
    assert auto["status"] == "ok"
    if HAS_CUDA:
        assert (auto["device"], auto["device_note"]) == ("cuda:0", "")
        assert (forced["status"], forced["device"], forced["device_note"]) == ("ok", "cuda:0", "")
    else:
        assert auto["device"] == "cpu"
        assert auto["device_note"] == ("use_gpu: node site-auto has no CUDA GPU that torch can use; this round "
                                       "trained on the CPU")
        assert forced["status"] == "error" and forced["device"] == ""
        assert "node site-cuda is set to train on cuda (device in its config.toml), but torch there sees no CUDA " \
               'GPU' in forced["reason"] and 'sets device = "auto" or "cpu"' in forced["reason"]
        log = nodes["site-cuda"].directory / "node.log"
        wait_until(lambda: "training rounds will fail" in log.read_text(errors="replace"), 10,
                   "the node's warning about its device setting")

    plain = Experiment(researcher, ["cancer"], ScaledLogReg, model_args={"n_features": 30}, training_args=ARGS,
                       rounds=1, round_timeout=90)
    history = plain.run().set_index("node_id")
    assert history.loc[[ids["site-cpu"], ids["site-auto"]], "device"].tolist() == ["cpu", "cpu"]
    if HAS_CUDA:  # the operator's "cuda" trains every round there, and says so to a round that did not ask
        assert history.loc[ids["site-cuda"], "device"] == "cuda:0"
        assert "although use_gpu is False" in history.loc[ids["site-cuda"], "device_note"]
    else:
        assert "device_note" not in history.columns  # nothing to explain: every round trained where asked
        assert history.loc[ids["site-cuda"], "status"] == "error"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU that torch can use")
def test_a_real_gpu_round_on_a_node_matches_local_training_on_the_cpu(tmp_path, address) -> None:
    frame = breast_cancer_splits(1)[0]
    node = _node(tmp_path, address, "site-gpu", frame, "cuda").start()
    try:
        with Researcher(address, heartbeat_interval=HEARTBEAT) as researcher:
            researcher.wait_for_nodes(1, timeout=30)
            args = {**ARGS, "epochs": 3, "use_gpu": True}
            exp = Experiment(researcher, ["cancer"], ScaledLogReg, model_args={"n_features": 30},
                             training_args=args, rounds=2, round_timeout=120)
            history = exp.run()
        assert history["device"].tolist() == ["cuda:0", "cuda:0"] and (history["status"] == "ok").all()
        local = LocalJob(frame, ScaledLogReg, {"n_features": 30}, {**args, "use_gpu": False}, rounds=2)
        for name, value in local.run().items():
            np.testing.assert_allclose(exp.params[name], value, rtol=1e-4, atol=1e-5)
    finally:
        node.stop()
