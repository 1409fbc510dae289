"""The notebook forms against real `fedlab node start` processes: what a researcher clicking sees.

Statistics and a histogram from the stats form equal pandas on the pooled rows; the
preprocessing form writes a derived dataset on every node; the training form asks for
approval, its panel flips when the operators approve through the node CLI, and training
turns every progress bar green with the history and the loss plot left as static output.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from federation import HEARTBEAT, breast_cancer_splits

w = pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")

from fedlab.notebook.forms import preprocess_form, stats_form, train_form  # noqa: E402
from fedlab.notebook.progress import STEPS  # noqa: E402
from fedlab.notebook.session import Session  # noqa: E402

pytestmark = pytest.mark.integration

PLAN = '''
import torch.nn.functional as F
from torch import nn

from fedlab import TorchTrainingPlan


class CancerLogReg(TorchTrainingPlan):
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
'''


@pytest.fixture(autouse=True)
def close_widgets():
    yield
    w.Widget.close_all()


@pytest.fixture
def federation(make_nodes, address, monkeypatch):
    """Three running nodes (approval required) and the notebook session the magics would use."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # node processes inherit it: calm on a 2-core machine
    nodes = [node.start() for node in make_nodes(3, heartbeat=0.5)]
    session = Session(address, heartbeat_interval=HEARTBEAT)
    session.connect(wait=3)
    yield session, nodes
    session.close()


def test_stats_form_on_real_nodes_equals_pandas_on_the_pooled_rows(federation):
    session, _ = federation
    pooled = pd.concat(breast_cancer_splits(3), ignore_index=True)
    form = stats_form(session)
    assert set(form.tags.options) == {"breast-cancer", "csv"}
    assert list(form.columns.options) == list(pooled.columns)  # from the nodes' dataset metadata
    form.tags.value = ("breast-cancer",)
    form.columns.value = ("mean radius", "mean area")
    form.hist_column.value = "mean radius"
    form.bins.value = "6, 10, 14, 18, 22, 30"  # nodes release no min/max by default: a count would need them
    assert form.commands() == [
        "%fed stats count mean std --tags breast-cancer --columns 'mean radius' 'mean area'",
        "%fed hist 'mean radius' --tags breast-cancer --edges 6 10 14 18 22 30"]
    result = form.submit()
    stats = result.global_stats()
    for column in ("mean radius", "mean area"):
        assert stats.loc[column, "count"] == len(pooled)
        assert stats.loc[column, "mean"] == pytest.approx(pooled[column].mean(), rel=1e-9)
        assert stats.loc[column, "std"] == pytest.approx(pooled[column].std(), rel=1e-9)
    expected, _ = np.histogram(pooled["mean radius"], bins=[6, 10, 14, 18, 22, 30])
    hist = form.histogram
    released = hist["suppressed_on"] == ""  # a bin too small on some node is withheld there, and says so
    assert released.any()
    assert hist.loc[released, "count"].tolist() == expected[released.to_numpy()].tolist()
    shown = [set(o["data"]) for o in form.output.outputs]
    assert shown == [{"text/plain", "text/html"}, {"text/plain", "text/html"}, {"text/plain", "image/png"}]
    assert "mean radius" in form.output.outputs[0]["data"]["text/html"]


def test_preprocess_form_writes_a_derived_dataset_on_every_node(federation):
    session, _ = federation
    form = preprocess_form(session)
    form.tags.value = ("breast-cancer",)
    form.add_step("standardize", ["mean radius", "mean area"])
    form.name.value = "bc-std"
    form.new_tags.value = "bc-std"
    assert form.commands() == ["%fed preprocess --tags breast-cancer --name bc-std --new-tags bc-std "
                               "--standardize 'mean radius' 'mean area'"]
    derived = form.submit()
    assert len(derived) == 3 and form.status.value == "done: 3 nodes hold bc-std"
    assert "bc-std" in form.tags.options  # the refreshed choices offer the new dataset
    check = session.researcher.stats(session.researcher.search(["bc-std"]), ["mean"], ["mean radius"])
    assert check.global_stats().loc["mean radius", "mean"] == pytest.approx(0.0, abs=1e-9)


def test_train_form_approval_flips_on_cli_approval_then_training_turns_bars_green(federation):
    pytest.importorskip("torch")
    session, nodes = federation
    session.add_plan("logreg", PLAN)  # what a `%%fed plan logreg` cell does
    form = train_form(session)
    form.tags.value = ("breast-cancer",)
    form.rounds.value = 2
    form.lr.value = 0.001
    form.model_args.value = '{"n_features": 30}'
    form.extra_args.value = '{"test_ratio": 0.2, "test_on_global_updates": true, "progress_interval": 0.0}'
    panel = form.approve()
    assert panel in form.panels.children
    assert {r.status.value for r in panel.rows.values()} == {"Pending"}
    plan_id = form.plan_id
    assert {r.plan.value for r in panel.rows.values()} == {plan_id[:12]}
    for node in nodes:
        row = panel.rows[node.node_id]
        assert row.command.value.startswith("fedlab node plan approve ") and row.command.value.endswith(plan_id[:12])
        cli = subprocess.run([sys.executable, "-m", "fedlab", "node", "plan", "approve", str(node.directory),
                              plan_id[:12]], capture_output=True, text=True, timeout=60, check=False)
        assert cli.returncode == 0, cli.stderr
    assert panel.wait(30), [r.status.value for r in panel.rows.values()]
    assert {r.status.value for r in panel.rows.values()} == {"Approved"}

    history = form.submit()
    progress = form.progress
    assert progress is not None and progress.status == "done" and progress.events > 0
    assert set(history.loc[history["kind"] == "training", "status"]) == {"ok"}
    assert len(history[history["kind"] == "training"]) == 6
    for row in progress.rows.values():
        assert (row.bar.value, row.bar.bar_style, row.state.value) == (2 * STEPS, "success", "done")
        assert row.loss.value.startswith("loss ")
    table, plot = progress.output.outputs
    assert "train_loss" in table["data"]["text/html"] and "image/png" in plot["data"]
    assert form.status.value == "done: 2/2 rounds"

    # the Train button: a background job that %fed jobs lists, the panel green when it ends
    form.rounds.value = 1
    form.submit_button.click()
    form.wait(90)
    assert form.error is None, form.error
    job = form.job
    assert job is not None and session.jobs[job.name] is job and job.status == "done"
    assert session.jobs_frame().loc[0, ["plan", "status", "round", "rounds"]].tolist() == ["logreg", "done", 1, 1]
    assert {r.bar.bar_style for r in form.progress.rows.values()} == {"success"}
    assert form.status.value == f"job {job.name} done: 1/1 rounds"
