"""DP training with real `fedlab node start` processes: a node's budget pays for DP-SGD rounds, composed by its
RDP accountant, and refuses what it cannot pay for, also after a restart.

Two nodes hold the breast cancer data: ``a`` requires DP (default budget), ``b`` does not but has a budget
that pays for one DP round of this experiment and not two. A plain run is refused by ``a`` with its reason;
so is a hand-written TrainRequest without dp_args. A DP FedAvg run spends, per node and round, exactly the
increase of the composed ε that the test computes on its own, the ledgers in the nodes' node.db say the
same, ``b`` refuses its second round with budget_exhausted and the history says so, and a restart of
``b`` changes nothing of that.
"""

from __future__ import annotations

import pytest
from federation import HEARTBEAT, NodeProcess, breast_cancer_splits

from fedlab import Experiment, Researcher
from fedlab.node.dp_ledger import DPLedger
from fedlab.privacy.dp_rules import DPRules
from fedlab.privacy.dp_training import epsilon, local_round, planned_steps, sample_rate
from fedlab.protocol import ErrorReply
from fedlab.researcher.policies import DiscardOnTimeout
from fedlab.researcher.requests import MessagesByNode
from fedlab.training.messages import TrainRequest
from fedlab.training.source import plan_source

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from fedlab import TorchTrainingPlan  # noqa: E402

pytestmark = pytest.mark.integration

TAGS = ["breast-cancer"]
DP = {"type": "local", "sigma": 1.0, "clip": 1.0}
ARGS = {"epochs": 1, "batch_size": 32, "optimizer_args": {"lr": 0.5}, "seed": 1}
DELTA = 1e-7  # a tenth of the nodes' delta (1e-6): the default of a DP experiment
B_BUDGET = 5.0


class CancerDP(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(30, 1)

    def training_data(self, dataset):
        x = torch.log1p(torch.tensor(dataset.drop(columns="target").to_numpy("float32")))
        return x, dataset["target"].to_numpy("float32")

    def training_step(self, data, target):
        return F.binary_cross_entropy_with_logits(self.model(data).squeeze(1), target)


def configured(node: NodeProcess, **privacy: object) -> NodeProcess:
    path = node.directory / "config.toml"
    text = path.read_text().replace("require_approval = true", "require_approval = false")
    for key, value in privacy.items():
        old = {"require_dp": "require_dp = false", "epsilon_budget": "epsilon_budget = 10.0"}[key]
        text = text.replace(old, f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
    path.write_text(text)
    return node


def composed(n_rows: int, rounds: int) -> float:
    """The ε of ``rounds`` rounds of this experiment on a node of ``n_rows`` rows, computed here."""
    r = local_round(1.0, sample_rate(32, n_rows), planned_steps(n_rows, 32, 1, None))
    return epsilon([r] * rounds, DELTA)


def ledger(node: NodeProcess) -> float:
    return sum(row.epsilon_spent for row in DPLedger(node.directory / "node.db", DPRules()).rows())


@pytest.fixture(autouse=True)
def one_thread_per_node(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.timeout(240)
def test_dp_fedavg_spends_the_composed_epsilon_and_budgets_refuse_with_their_reason(tmp_path, address):
    frames = breast_cancer_splits(2)
    a = configured(NodeProcess.create(tmp_path, "hospital-a", address, frame=frames[0], heartbeat=0.5),
                   require_dp=True)
    b = configured(NodeProcess.create(tmp_path, "hospital-b", address, frame=frames[1], heartbeat=0.5),
                   epsilon_budget=B_BUDGET)
    sizes = {a.node_id: len(frames[0]), b.node_id: len(frames[1])}
    assert composed(sizes[b.node_id], 1) < B_BUDGET < composed(sizes[b.node_id], 2)  # the test's premise
    nodes = [a.start(), b.start()]
    try:
        with Researcher(address, heartbeat_interval=HEARTBEAT) as researcher:
            researcher.wait_for_nodes(2, timeout=60)
            # without DP: the require_dp node refuses, and says how to ask
            plain = Experiment(researcher, TAGS, CancerDP, training_args=ARGS, rounds=1, round_timeout=120,
                               disconnect_grace=30)
            rows = plain.run().set_index("node_id")
            assert rows.loc[b.node_id, "status"] == "ok" and rows.loc[a.node_id, "status"] == "refused"
            assert "[disclosure_refused] require_dp:" in rows.loc[a.node_id, "reason"]
            assert "dp_args" in rows.loc[a.node_id, "reason"]
            assert "epsilon" not in rows  # a plain run has no DP columns

            # a hand-written request without dp_args: the same refusal
            dataset = plain.fds.dataset(a.node_id).dataset_id
            source, cls = plan_source(CancerDP)
            request = TrainRequest(experiment_id="hand", round=1, dataset_id=dataset, plan_source=source,
                                   plan_class=cls, params=[], training_args=ARGS)
            with researcher.requests.send(MessagesByNode({a.node_id: request}), [a.node_id],
                                          [DiscardOnTimeout(60)]) as sent:
                pass
            error = sent.errors()[a.node_id]
            assert isinstance(error, ErrorReply) and error.code == "disclosure_refused"
            assert error.message.startswith("require_dp:")

            # with DP: every round spends the increase of the composed epsilon; b's budget runs out
            exp = Experiment(researcher, TAGS, CancerDP, training_args={**ARGS, "dp_args": DP}, rounds=2,
                             round_timeout=120, disconnect_grace=30)
            history = exp.run()
            by = {(r.round, r.node_id): r for r in history.itertuples()}
            for node_id, n in sizes.items():
                first = by[(1, node_id)]
                assert first.status == "ok" and first.epsilon == pytest.approx(composed(n, 1), rel=1e-9)
                assert first.delta == pytest.approx(DELTA) and first.n_updates == planned_steps(n, 32, 1, None)
                assert pd_isna(first.train_loss)  # a DP round sends no loss
            second_a, second_b = by[(2, a.node_id)], by[(2, b.node_id)]
            assert second_a.status == "ok" and second_a.delta == 0.0
            assert second_a.epsilon == pytest.approx(composed(sizes[a.node_id], 2) - composed(sizes[a.node_id], 1),
                                                     rel=1e-6)
            assert second_a.epsilon_spent == pytest.approx(composed(sizes[a.node_id], 2), rel=1e-9)
            assert second_b.status == "refused" and "[budget_exhausted] epsilon_budget:" in second_b.reason
            assert "round 2 of experiment" in second_b.reason and exp.round_current == 2
            assert ledger(a) == pytest.approx(history[history.node_id == a.node_id].epsilon.sum(), rel=1e-9)
            assert ledger(b) == pytest.approx(composed(sizes[b.node_id], 1), rel=1e-9)
            assert '"dp_spent"' in (b.directory / "audit.log").read_text()

            # a restart keeps what was spent: b refuses the next round again, its balance unchanged
            b.stop()
            b.start()
            researcher.wait_for_nodes(2, timeout=60)
            third = exp.run(1, increase=True)
            third = third[third["round"] == 3].set_index("node_id")
            assert third.loc[b.node_id, "status"] == "refused", third.loc[b.node_id, "reason"]
            assert "budget_exhausted" in third.loc[b.node_id, "reason"]
            assert third.loc[a.node_id, "status"] == "ok"
            balance = researcher.privacy_budget(exp.fds)
            spent = dict(zip(balance["epsilon_spent"].index, balance["epsilon_spent"], strict=True))
            names = researcher._names()
            assert spent[names[b.node_id]] == pytest.approx(composed(sizes[b.node_id], 1), rel=1e-9)
            assert spent[names[a.node_id]] == pytest.approx(composed(sizes[a.node_id], 3), rel=1e-9)
            privacy = exp.privacy()  # the experiment's own summary, from the nodes' replies
            assert privacy.loc[names[a.node_id], "dp_rounds"] == 3
            assert privacy.loc[names[a.node_id], "epsilon"] == pytest.approx(composed(sizes[a.node_id], 3), rel=1e-9)
            assert privacy.loc[names[b.node_id], ["dp_rounds", "last_status"]].tolist() == [1, "refused"]
            assert "budget_exhausted" in privacy.loc[names[b.node_id], "last_reason"]
    finally:
        for node in nodes:
            node.stop()
    assert ledger(b) == pytest.approx(composed(sizes[b.node_id], 1), rel=1e-9)


def pd_isna(value: object) -> bool:
    import pandas as pd

    return bool(pd.isna(value))
