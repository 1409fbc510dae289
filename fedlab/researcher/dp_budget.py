"""Researcher.privacy_budget: what remains of this researcher's DP budget on each node, from the nodes.

The budget is the node's (its operator sets it, its ledger in ``node.db`` records every spend), so the
researcher asks rather than keeps a tally of its own: one ``PrivacyBudgetRequest`` per node, answered
from the node's ledger for the dataset's source.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from fedlab.protocol.dp_messages import PrivacyBudgetReply, PrivacyBudgetRequest
from fedlab.researcher.federated_dataset import FederatedDataset
from fedlab.researcher.jobs import Job
from fedlab.researcher.policies import DiscardOnTimeout
from fedlab.researcher.requests import MessagesByNode, Requests

__all__ = ["BUDGET_COLUMNS", "PrivacyBudgetJob", "privacy_budget"]

BUDGET_COLUMNS = ["node", "epsilon_spent", "epsilon_remaining", "epsilon_budget", "delta_spent", "delta_remaining",
                  "delta_budget", "require_dp", "spends", "status"]


class PrivacyBudgetJob(Job):
    """Ask every node of ``fds`` for this researcher's balance on its dataset."""

    def __init__(self, fds: FederatedDataset, *, researcher_id: str, requests: Requests, timeout: float) -> None:
        super().__init__(researcher_id=researcher_id, requests=requests, nodes=fds.node_ids(),
                         policies=[DiscardOnTimeout(timeout)])
        self._fds = fds

    def execute(self) -> dict[str, PrivacyBudgetReply]:
        messages = MessagesByNode({n: PrivacyBudgetRequest(dataset_id=self._fds.dataset(n).dataset_id)
                                   for n in self.nodes or []})
        return self._send(messages, PrivacyBudgetReply, "the privacy budget request")


def privacy_budget(fds: FederatedDataset, *, researcher_id: str, requests: Requests,
                   node_names: Mapping[str, str] | None = None, timeout: float = 30.0) -> pd.DataFrame:
    """One row per node; a node that failed or did not answer has a row with its status and NaNs."""
    names = dict(node_names or {})
    job = PrivacyBudgetJob(fds, researcher_id=researcher_id, requests=requests, timeout=timeout)
    replies = job.execute()
    rows = []
    for node_id in fds.node_ids():
        name = names.get(node_id, node_id)
        reply = replies.get(node_id)
        if reply is not None:
            b = reply.balance
            rows.append({"node": name, "epsilon_spent": b.epsilon_spent, "epsilon_remaining": b.epsilon_remaining,
                         "epsilon_budget": b.epsilon_budget, "delta_spent": b.delta_spent,
                         "delta_remaining": b.delta_remaining, "delta_budget": b.delta_budget,
                         "require_dp": b.require_dp, "spends": b.n_spends, "status": "answered"})
        else:
            error, missing = job.errors.get(node_id), job.missing.get(node_id)
            status = f"[{error.code}] {error.message}" if error is not None else f"no answer: {missing}"
            rows.append({"node": name, "status": status})
    return pd.DataFrame(rows, columns=BUDGET_COLUMNS).set_index("node")
