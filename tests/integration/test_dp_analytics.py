"""DP analytics with real `fedlab node start` processes over ZeroMQ, budgets in each node's node.db.

A node with require_dp refuses exact statistics and answers DP ones; every node spends what it says and
the ledger in its node.db matches; the researcher's privacy_budget() reads the nodes' own balances; a
spent budget refuses the next request, naming what remains, also for hand-written messages and after a
restart; DP figures land near the pooled ones.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from federation import HEARTBEAT, NodeProcess, breast_cancer_splits

from fedlab import Researcher
from fedlab.analytics.messages import FAReply, FARequest
from fedlab.node.dp_ledger import DPLedger
from fedlab.privacy.dp_rules import DPRules
from fedlab.protocol import ErrorReply
from fedlab.protocol.dp_messages import DPQuery
from fedlab.researcher.policies import DiscardOnTimeout
from fedlab.researcher.requests import MessagesByNode

pytest.importorskip("opendp")
pytestmark = pytest.mark.integration

TAGS = ("breast-cancer", "csv")
BOUNDS = {"mean radius": (5.0, 30.0), "mean area": (100.0, 2600.0)}


def privacy_table(budget: float, require_dp: bool) -> str:
    return f"require_dp = {'true' if require_dp else 'false'}\nepsilon_budget = {budget}\n"


@pytest.fixture
def dp_nodes(tmp_path, address):
    started: list[NodeProcess] = []

    def make(settings: list[tuple[float, bool]]) -> list[NodeProcess]:
        for i, ((budget, require), frame) in enumerate(zip(settings, breast_cancer_splits(len(settings)),
                                                           strict=True)):
            node = NodeProcess.create(tmp_path, f"hospital-{chr(97 + i)}", address, frame=frame)
            path = node.directory / "config.toml"
            text = path.read_text()
            text = text.replace("require_dp = false", f"require_dp = {'true' if require else 'false'}")
            text = text.replace("epsilon_budget = 10.0", f"epsilon_budget = {budget}")
            path.write_text(text)
            started.append(node.start())
        return started

    yield make
    for node in started:
        node.stop()


def ledger_spent(node: NodeProcess) -> float:
    return sum(r.epsilon_spent for r in DPLedger(node.directory / "node.db", DPRules()).rows())


@pytest.mark.timeout(240)
def test_require_dp_node_refuses_exact_and_every_node_spends_what_it_says(address, dp_nodes):
    nodes = dp_nodes([(3.0, True), (3.0, False)])
    pooled = pd.concat(breast_cancer_splits(2), ignore_index=True)
    with Researcher(address, heartbeat_interval=HEARTBEAT) as researcher:
        researcher.wait_for_nodes(2, timeout=60)
        fds = researcher.search(list(TAGS))
        exact = researcher.stats(fds, ["mean"], columns=["mean radius"])
        strict = nodes[0].node_id
        assert strict in exact.refused and "require_dp" in exact.refused[strict]
        assert list(exact.replies) == [nodes[1].node_id]

        result = researcher.stats(fds, ["count", "mean", "std", "median"], columns=list(BOUNDS), epsilon=1.0,
                                  bounds=BOUNDS)
        assert sorted(result.replies) == sorted(n.node_id for n in nodes)
        table = result.privacy()
        assert table["epsilon_spent"].tolist() == pytest.approx([1.0, 1.0])
        assert table["epsilon_remaining"].tolist() == pytest.approx([2.0, 2.0])
        stats = result.global_stats()
        truth = pooled["mean radius"]
        # 4 queries per column, 8 in all: the sum's Laplace scale is 25 * 8 = 200 per node, over 569 rows
        assert abs(stats.loc["mean radius", "mean"] - truth.mean()) < 3.0
        assert abs(stats.loc["mean radius", "count"] - truth.count()) < 200
        assert 5.0 <= stats.loc["mean radius", "median"] <= 30.0
        assert set(result.noise().columns) >= {"mean radius.sum", "mean area.quantiles"}
        assert any("differentially private" in line for line in result.notes())

        budget = researcher.privacy_budget(fds)
        assert budget["epsilon_spent"].tolist() == pytest.approx([1.0, 1.0])
        assert budget["require_dp"].tolist() in ([True, False], [False, True])
        for node in nodes:
            assert ledger_spent(node) == pytest.approx(1.0)

        second = researcher.stats(fds, ["count"], columns=["mean radius"], epsilon=1.5)
        assert len(second.replies) == 2
        over = researcher.stats(fds, ["count"], columns=["mean radius"], epsilon=1.0)
        assert not over.replies and len(over.refused) == 2
        assert all("budget_exhausted" in why and "epsilon=0.5" in why for why in over.refused.values())
    for node in nodes:
        assert ledger_spent(node) == pytest.approx(2.5)  # the refused request spent nothing


@pytest.mark.timeout(240)
def test_hand_written_requests_and_a_restart_cannot_reset_or_exceed_the_budget(address, dp_nodes):
    (node,) = dp_nodes([(2.0, True)])
    with Researcher(address, heartbeat_interval=HEARTBEAT) as researcher:
        researcher.wait_for_nodes(1, timeout=60)
        fds = researcher.search(list(TAGS))
        dataset = fds.dataset(node.node_id).dataset_id

        def send(messages: list[FARequest]) -> list[object]:
            out = []
            for message in messages:  # one after the other, each a real message over the socket
                with researcher.requests.send(MessagesByNode({node.node_id: message}), [node.node_id],
                                              [DiscardOnTimeout(60)]) as request:
                    pass
                reply = request.replies().get(node.node_id)
            out.append(reply.content if reply is not None else request.errors()[node.node_id])
            return out

        # a researcher who varies the request: the same column asked with different bounds and stats
        answers = send([FARequest(dataset_id=dataset, stats=["mean"], columns=["mean radius"],
                                  dp=DPQuery(epsilon=0.5, bounds={"mean radius": [5.0, 30.0 + i]}))
                        for i in range(3)])
        assert all(isinstance(a, FAReply) for a in answers)
        exact = send([FARequest(dataset_id=dataset, stats=["mean"], columns=["mean radius"])])[0]
        assert isinstance(exact, ErrorReply) and exact.code == "disclosure_refused"
        node.stop()
        node.start()
        researcher.wait_for_nodes(1, timeout=60)
        after = send([FARequest(dataset_id=dataset, stats=["count"], dp=DPQuery(epsilon=0.6))])[0]
        assert isinstance(after, ErrorReply) and after.code == "budget_exhausted", after
        assert "epsilon=0.5" in after.message
        last = send([FARequest(dataset_id=dataset, stats=["count"], dp=DPQuery(epsilon=0.5))])[0]
        assert isinstance(last, FAReply) and last.dp is not None
        assert last.dp.balance.epsilon_remaining == pytest.approx(0.0, abs=1e-9)
    assert ledger_spent(node) == pytest.approx(2.0)
    audit = (node.directory / "audit.log").read_text()
    assert audit.count('"dp_spent"') == 4 and "budget_exhausted" in audit
    assert np.isfinite(ledger_spent(node))
