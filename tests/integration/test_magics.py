"""%fed in an IPython shell against real `fedlab node start` processes: what a notebook user sees.

Analytics lines give the pooled figures as DataFrames; a plan written with %%fed plan is
refused until each node's operator approves it through the node CLI, which the approval
panel shows without the line being run again; training runs in the cell and in the
background with the progress panel, and a background job can be cancelled mid-round.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from federation import breast_cancer_splits, wait_until

pytest.importorskip("IPython")
pytest.importorskip("ipywidgets")

from IPython.core.error import UsageError  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

from fedlab.notebook import current_session  # noqa: E402

pytestmark = pytest.mark.integration

TAGS = "breast-cancer"
PLAN = '''
class LogReg(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(model_args["n_features"], 1)

    def training_data(self, dataset):
        x = dataset.drop(columns="target").to_numpy("float32")
        return (x - x.mean(0)) / (x.std(0) + 1e-6), dataset["target"].to_numpy("float32")

    def training_step(self, data, target):
        return F.binary_cross_entropy_with_logits(self.model(data).squeeze(1), target)
'''
TRAIN = (f"--tags {TAGS} --model-args '{{\"n_features\": 30}}' "
         "--training-args '{\"epochs\": 1, \"batch_size\": 32, \"optimizer_args\": {\"lr\": 0.1}, \"seed\": 0}'")


@pytest.fixture(autouse=True)
def one_thread_per_node(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def ip(monkeypatch):
    import ipywidgets

    monkeypatch.delenv("FEDLAB_ADDRESS", raising=False)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "fedlab")
    yield shell
    shell.run_line_magic("unload_ext", "fedlab")
    InteractiveShell.clear_instance()
    ipywidgets.Widget.close_all()


@pytest.fixture
def nodes(make_nodes):
    created = make_nodes(3)
    for node in created:
        node.heartbeat = 0.5  # torch's first import on a busy machine must not look like a disconnect
    return created


def usage(ip, line: str) -> str:
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("fed", line)
    assert type(info.value) is UsageError and "\n" not in str(info.value)
    return str(info.value)


def start(nodes, *, approval: bool = True):
    for node in nodes:
        if not approval:
            path = node.directory / "config.toml"
            path.write_text(path.read_text().replace("require_approval = true", "require_approval = false"))
        node.start()


def test_connect_nodes_datasets_stats_and_hist_as_dataframes(ip, nodes, address, capsys):
    start(nodes)
    frame = ip.run_line_magic("fed", f"connect {address} --wait 3")
    assert sorted(frame["name"]) == ["hospital-a", "hospital-b", "hospital-c"]
    assert (ip.run_line_magic("fed", "nodes")["status"] != "offline").all()
    listed = ip.run_line_magic("fed", "datasets")
    assert len(listed) == 3 and set(listed["name"]) == {"bc"}
    found = ip.run_line_magic("fed", f"datasets --tags {TAGS} --out fds")
    assert found["n_samples"].sum() == 569 and ip.user_ns["fds"] is found

    pooled = pd.concat(breast_cancer_splits(3), ignore_index=True)
    stats = ip.run_line_magic("fed", f"stats count mean std --tags {TAGS} --columns 'mean radius' target --out s")
    assert ip.user_ns["s"] is stats and list(stats.index) == ["mean radius", "target"]
    for column in stats.index:
        assert stats.loc[column, "count"] == 569
        np.testing.assert_allclose(stats.loc[column, ["mean", "std"]].astype(float),
                                   [pooled[column].mean(), pooled[column].std()], rtol=1e-9)

    # edges with at least min_count of every node's values on each side (or far outside): exact
    hist = ip.run_line_magic("fed", f"hist 'mean radius' --tags {TAGS} --edges 0 12 14 16 18 40")
    expected = np.histogram(pooled["mean radius"], bins=[0, 12, 14, 16, 18, 40])[0]
    assert hist["count"].tolist() == expected.tolist() and not any(hist["suppressed_on"])
    # the default disclosure rules keep min and max private: a bin count needs them, the error says so
    assert "edges" in usage(ip, f"hist 'mean radius' --tags {TAGS} --bins 4")
    assert "no node holds a dataset tagged ['nope']" in usage(ip, "stats mean --tags nope")
    assert "are not in the dataset" in usage(ip, f"stats mean --tags {TAGS} --columns nope")

    derived = ip.run_line_magic("fed", f"preprocess --tags {TAGS} --name bc-std --new-tags bc-std "
                                       "--standardize 'mean radius' 'mean area'")
    assert len(derived) == 3 and derived["n_samples"].sum() == 569
    scaled = ip.run_line_magic("fed", "stats mean std --tags bc-std --columns 'mean radius' 'mean area'")
    np.testing.assert_allclose(scaled["mean"].astype(float), 0.0, atol=1e-9)
    np.testing.assert_allclose(scaled["std"].astype(float), np.sqrt(569 / 568), rtol=1e-9)  # population std

    assert ip.run_line_magic("fed", "form stats") is None  # the form is displayed, built on this session


def test_plan_is_refused_until_approved_through_the_cli_and_the_panel_flips(ip, nodes, address, capsys):
    start(nodes)
    session = current_session(ip)
    ip.run_line_magic("fed", f"connect {address} --wait 3")
    ip.run_cell_magic("fed", "plan logreg", PLAN)
    assert ip.user_ns["LogReg"].__name__ == "LogReg"

    message = usage(ip, f"train logreg --rounds 1 {TRAIN}")
    assert "approve" in message  # the nodes refuse an unknown plan and say what the operator must run
    waited = usage(ip, f"approve logreg --tags {TAGS} --poll 0.2 --wait 0.5")
    assert "not approved on 3 node(s) after 0.5 s: hospital-" in waited and ": Pending (" in waited
    assert waited.count("fedlab node plan approve") == 3  # each operator's exact command
    ip.run_line_magic("fed", f"approve logreg --tags {TAGS} --poll 0.2 --description 'tumour model' --out panel")
    panel = ip.user_ns["panel"]
    assert panel is session.panels["logreg"] and not panel.approved
    status = ip.run_line_magic("fed", f"status logreg --tags {TAGS}")
    assert set(status["status"]) == {"Pending"} and status["plan_id"].nunique() == 1
    plan_id = status.loc[0, "plan_id"]
    assert "fedlab node plan approve" in " ".join(status["message"])

    for node in nodes:
        cli = subprocess.run([sys.executable, "-m", "fedlab", "node", "plan", "approve", str(node.directory),
                              plan_id], capture_output=True, text=True, timeout=60, check=False)
        assert cli.returncode == 0, cli.stderr
    assert panel.wait(30)  # flipped by its own polling: the line was not run again
    assert set(ip.run_line_magic("fed", f"status logreg --tags {TAGS}")["status"]) == {"Approved"}
    ip.run_line_magic("fed", f"approve logreg --tags {TAGS} --wait 30")  # already approved: returns at once

    history = ip.run_line_magic("fed", f"train logreg --rounds 2 {TRAIN} --out history")
    assert ip.user_ns["history"] is history
    assert len(history) == 6 and (history["status"] == "ok").all() and history["round"].max() == 2
    progress = session.progress["logreg"]
    assert progress.status == "done" and progress.events > 0
    assert {row.bar.bar_style for row in progress.rows.values()} == {"success"}


def test_background_training_jobs_and_cancel(ip, nodes, address, capsys, monkeypatch):
    from fedlab.notebook.magics import FedMagics
    from fedlab.notebook.session import Session

    start(nodes, approval=False)
    monkeypatch.setenv("FEDLAB_ADDRESS", address)  # what a notebook run against these nodes is given
    session = Session()
    ip.register_magics(FedMagics(ip, session))
    assert current_session(ip) is session and not session.connected
    ip.run_cell_magic("fed", "plan logreg", PLAN)
    wait_until(lambda: len(ip.run_line_magic("fed", "nodes")) == 3, 30, "3 nodes after connecting on first use")
    assert session.researcher.address == address

    assert "unknown aggregator 'nope'" in usage(ip, f"train logreg --rounds 1 {TRAIN} --aggregator nope")
    assert "epoch" in usage(ip, f"train logreg --rounds 1 --tags {TAGS} --training-args '{{\"epoch\": 1}}'")
    assert "no node holds a dataset tagged ['nope']" in usage(ip, "train logreg --rounds 1 --tags nope")
    assert ip.run_line_magic("fed", f"train logreg --rounds 3 {TRAIN} --background --out job") is None
    job = ip.user_ns["job"]
    assert job is session.jobs[job.name] and job.name == "logreg-1"
    jobs = ip.run_line_magic("fed", "jobs")
    assert jobs["job"].tolist() == ["logreg-1"] and jobs.loc[0, "rounds"] == 3
    assert job.wait(90) and job.status == "done", job.error
    assert len(job.history) == 9 and (job.history["status"] == "ok").all()
    assert job.panel.status == "done" and ip.run_line_magic("fed", "jobs").loc[0, "status"] == "done"

    # a long round: many epochs of one-sample batches; cancel stops it on the nodes, not after it
    slow = TRAIN.replace('"epochs": 1, "batch_size": 32', '"epochs": 400, "batch_size": 1')
    ip.run_line_magic("fed", f"train logreg --rounds 5 {slow} --background --out slow")
    slow_job = ip.user_ns["slow"]
    wait_until(lambda: slow_job.panel.events > 0, 60, "progress from the nodes")
    assert slow_job.running and slow_job.experiment.round_current == 0
    started = time.monotonic()
    ip.run_line_magic("fed", f"cancel {slow_job.name}")
    assert slow_job.status == "cancelled" and time.monotonic() - started < 15
    assert slow_job.panel.status == "failed" and "stopped" in set(
        slow_job.history["reason"].str.split(":").str[0])
    assert "is already cancelled" in (ip.run_line_magic("fed", f"cancel {slow_job.name}") or
                                      capsys.readouterr().out)
    assert "no background job named 'other'" in usage(ip, "cancel other")
