"""%fed stats --epsilon and %fed budget against real `fedlab node start` processes: the noisy figures,
the budget panel after each DP answer, the nodes' own ledgers (read back by `fedlab node privacy`), and
a request over the budget refused by the nodes, with the panel still right."""

from __future__ import annotations

import pandas as pd
import pytest
from federation import breast_cancer_splits

pytest.importorskip("IPython")
pytest.importorskip("ipywidgets")
pytest.importorskip("opendp")

from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

from fedlab.cli import main  # noqa: E402
from fedlab.notebook import current_session  # noqa: E402

pytestmark = pytest.mark.integration

TAGS = "breast-cancer"
BUDGET = 2.0


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


@pytest.mark.timeout(240)
def test_dp_stats_and_budget_magics_follow_the_nodes_ledgers(ip, make_nodes, address, capsys):
    nodes = make_nodes(2)
    for node in nodes:
        path = node.directory / "config.toml"
        path.write_text(path.read_text().replace("epsilon_budget = 10.0", f"epsilon_budget = {BUDGET}"))
        node.start()
    ip.run_line_magic("fed", f"connect {address} --wait 2")
    capsys.readouterr()

    stats = ip.run_line_magic("fed", f"stats count mean --tags {TAGS} --columns 'mean radius' --epsilon 1.7 "
                                     "--bounds 'mean radius=5:30' --out s")
    assert ip.user_ns["s"] is stats
    truth = pd.concat(breast_cancer_splits(2), ignore_index=True)["mean radius"]
    # 2 queries (count, sum) per node at 0.85 each: the sum's Laplace scale is 25 / 0.85 per node
    assert abs(stats.loc["mean radius", "mean"] - truth.mean()) < 2.0
    assert "differentially private (laplace)" in capsys.readouterr().err

    panel = current_session(ip).budget
    assert sorted(panel.rows) == [("hospital-a", "bc"), ("hospital-b", "bc")]
    for row in panel.rows.values():
        assert (row.bar.value, row.bar.max) == (pytest.approx(1.7), BUDGET)
        assert row.bar.bar_style == "warning"  # 0.3 of 2 left: under a fifth
        assert row.numbers.value.startswith("ε 1.7 / 2 spent, 0.3 left")
        assert row.last.value.startswith("last answer: ε 1.7 (laplace, noise scale up to")

    # over the budget: every node refuses, names what remains, and spends nothing
    ip.run_line_magic("fed", f"stats count --tags {TAGS} --columns 'mean radius' --epsilon 1")
    err = capsys.readouterr().err
    assert err.count("budget_exhausted") == 2 and "epsilon=0.3" in err

    frame = ip.run_line_magic("fed", f"budget --tags {TAGS} --out left")
    assert ip.user_ns["left"] is frame and sorted(frame.index) == ["hospital-a", "hospital-b"]
    assert frame["epsilon_spent"].tolist() == pytest.approx([1.7, 1.7])
    assert frame["epsilon_remaining"].tolist() == pytest.approx([0.3, 0.3])
    assert current_session(ip).budget is panel
    assert all(row.last.value == "answered" and row.bar.value == pytest.approx(1.7) for row in panel.rows.values())

    # the operator's view of the same spending, from the node's own node.db
    assert main(["node", "privacy", str(nodes[0].directory)]) == 0
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith("insecure"))
    assert row[1:8] == ["bc", "1.7", "2", "0.3", "0", "1e-06", "1"]


DP_PLAN = '''
class CancerDP(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(30, 1)

    def training_data(self, dataset):
        x = torch.log1p(torch.tensor(dataset.drop(columns="target").to_numpy("float32")))
        return x, dataset["target"].to_numpy("float32")

    def training_step(self, data, target):
        return F.binary_cross_entropy_with_logits(self.model(data).squeeze(1), target)
'''
DP_TRAIN = ("--training-args '{\"epochs\": 1, \"batch_size\": 32, \"optimizer_args\": {\"lr\": 0.5}, "
            "\"dp_args\": {\"type\": \"local\", \"sigma\": 1.0, \"clip\": 1.0}}'")


@pytest.mark.timeout(300)
def test_dp_training_refreshes_the_budget_panel_after_every_round(ip, make_nodes, address, monkeypatch):
    pytest.importorskip("opacus")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from fedlab.node.dp_ledger import DPLedger
    from fedlab.privacy.dp_rules import DPRules

    nodes = make_nodes(2)
    for node in nodes:
        path = node.directory / "config.toml"
        path.write_text(path.read_text().replace("require_approval = true", "require_approval = false"))
        node.start()
    ip.run_line_magic("fed", f"connect {address} --wait 2")
    ip.run_cell_magic("fed", "plan dplin", DP_PLAN)
    history = ip.run_line_magic("fed", f"train dplin --rounds 2 --tags {TAGS} {DP_TRAIN}")
    assert (history["status"] == "ok").all() and history["epsilon"].notna().all()
    panel = current_session(ip).budget
    assert panel is not None and panel.updates >= 3  # shown before the first round, refreshed after each
    spent = {node.directory.name: sum(r.epsilon_spent for r in DPLedger(node.directory / "node.db",
                                                                       DPRules()).rows()) for node in nodes}
    assert all(value > 0 for value in spent.values())
    for (name, _), row in panel.rows.items():
        assert row.bar.value == pytest.approx(spent[name])  # after round 2: what each node's ledger says
