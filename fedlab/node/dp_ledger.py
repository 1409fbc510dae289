"""The node's differential-privacy ledger: every ε and δ each researcher spent, in ``node.db``.

A budget held in memory would reset with every restart, so every DP answer (an analytics reply, a
training round) is one row of ``dp_spends``, keyed by the researcher (``peer``: its public key, or
``insecure``) and the *source* the answer read (see :func:`source_key`): a dataset derived on this
node reads its source's rows, so it spends from its source's budget. A spend is checked and written
in one ``BEGIN IMMEDIATE`` transaction, which also serialises concurrent requests on the node, and
its answer is sent only after that transaction committed: an answer that was not recorded is never
sent (a crash in between loses the answer, never the record).

Composition is basic (the ε and δ of the rows add up), except within DP training, whose rounds a
handler may account together (a Rényi accountant over all of them) by keeping the parameters of each
round in the row's ``detail`` and spending only the increase of the total.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedlab.errors import FedlabBudgetError
from fedlab.node.registry import DatasetRecord, _connect, create_tables
from fedlab.privacy.dp_rules import DPRules
from fedlab.protocol.dp_messages import DPBalance

__all__ = ["DPLedger", "LedgerRow", "Spending", "source_key"]

# Float sums of many small spends must not refuse the last one that fits exactly.
_SLACK = 1e-9

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS dp_spends (id INTEGER PRIMARY KEY AUTOINCREMENT, peer TEXT NOT NULL,"
    " source TEXT NOT NULL, dataset TEXT NOT NULL, kind TEXT NOT NULL, label TEXT NOT NULL,"
    " msg_id TEXT NOT NULL, epsilon REAL NOT NULL, delta REAL NOT NULL, detail TEXT NOT NULL, at TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS dp_spends_key ON dp_spends (peer, source)",
)


def source_key(root: DatasetRecord) -> str:
    """The budget a dataset spends from: its root source's file (resolved), so that registering the
    same file again under another name does not open a fresh budget."""
    try:
        return str(Path(root.path).expanduser().resolve())
    except (OSError, RuntimeError):
        return str(root.path)


@dataclass(frozen=True)
class LedgerRow:
    """One line of ``fedlab node privacy DIR``: a researcher's spending on one source."""

    peer: str
    source: str
    dataset: str
    epsilon_spent: float
    delta_spent: float
    n_spends: int
    last: str


class Spending:
    """One transaction on one researcher's budget for one source (see :meth:`DPLedger.spending`)."""

    def __init__(self, conn: sqlite3.Connection, rules: DPRules, peer: str, source: str, dataset: str) -> None:
        self._conn, self._rules = conn, rules
        self._peer, self._source, self._dataset = peer, source, dataset

    def balance(self) -> DPBalance:
        eps, delta, n = self._conn.execute(
            "SELECT COALESCE(SUM(epsilon), 0), COALESCE(SUM(delta), 0), COUNT(*) FROM dp_spends"
            " WHERE peer = ? AND source = ?", (self._peer, self._source)).fetchone()
        return _balance(self._rules, float(eps), float(delta), int(n))

    def history(self, kind: str, label: str) -> list[dict[str, Any]]:
        """The ``detail`` of every earlier spend of ``kind`` and ``label`` on this budget, oldest first."""
        rows = self._conn.execute(
            "SELECT detail FROM dp_spends WHERE peer = ? AND source = ? AND kind = ? AND label = ? ORDER BY id",
            (self._peer, self._source, kind, label)).fetchall()
        return [json.loads(d) for (d,) in rows]

    def check(self, epsilon: float, delta: float, what: str) -> DPBalance:
        """Raise FedlabBudgetError unless ``epsilon`` and ``delta`` fit in what remains."""
        if not (math.isfinite(epsilon) and epsilon >= 0 and math.isfinite(delta) and delta >= 0):
            raise FedlabBudgetError(f"{what} would spend epsilon={epsilon}, delta={delta}: not a valid cost")
        balance = self.balance()
        if epsilon > balance.epsilon_remaining + _SLACK:
            raise FedlabBudgetError(
                f"epsilon_budget: {what} would spend epsilon={epsilon:.6g} on dataset {self._dataset}, but only "
                f"epsilon={balance.epsilon_remaining:.6g} of this researcher's {self._rules.epsilon_budget:g} remain "
                "on it (privacy.epsilon_budget); ask with a smaller epsilon, or ask the node's operator for a "
                "larger budget")
        if delta > balance.delta_remaining + _SLACK * self._rules.delta:
            raise FedlabBudgetError(
                f"delta: {what} would spend delta={delta:.3g} on dataset {self._dataset}, but only "
                f"delta={balance.delta_remaining:.3g} of this researcher's {self._rules.delta:g} remain on it "
                "(privacy.delta); use the Laplace mechanism (delta 0) or a smaller delta")
        return balance

    def spend(self, *, epsilon: float, delta: float, kind: str, label: str, msg_id: str,
              what: str, detail: Mapping[str, Any] | None = None) -> DPBalance:
        """Check, then record one spend; the balance after it. Committed when the transaction ends."""
        self.check(epsilon, delta, what)
        self._conn.execute(
            "INSERT INTO dp_spends (peer, source, dataset, kind, label, msg_id, epsilon, delta, detail, at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (self._peer, self._source, self._dataset, kind, label, msg_id, float(epsilon), float(delta),
             json.dumps(dict(detail or {}), sort_keys=True), datetime.now(UTC).isoformat(timespec="seconds")))
        return self.balance()


def _balance(rules: DPRules, eps: float, delta: float, n: int) -> DPBalance:
    return DPBalance(epsilon_budget=rules.epsilon_budget, delta_budget=rules.delta, epsilon_spent=eps,
                     delta_spent=delta, epsilon_remaining=max(0.0, rules.epsilon_budget - eps),
                     delta_remaining=max(0.0, rules.delta - delta), require_dp=rules.require_dp, n_spends=n)


class DPLedger:
    """The DP tables of one node database (``DIR/node.db``), created if missing."""

    def __init__(self, db_path: str | os.PathLike[str], rules: DPRules) -> None:
        self.db_path = Path(db_path).expanduser().resolve()
        self.rules = rules
        create_tables(self.db_path, *_SCHEMA)

    @contextmanager
    def spending(self, peer: str, source: str, dataset: str) -> Iterator[Spending]:
        """A transaction over ``peer``'s budget on ``source``: committed when the block ends without an
        exception (then, and only then, may the answer it paid for be sent), rolled back otherwise."""
        with _connect(self.db_path) as conn, conn:
            conn.execute("BEGIN IMMEDIATE")
            yield Spending(conn, self.rules, peer, source, dataset)

    def balance(self, peer: str, source: str) -> DPBalance:
        with _connect(self.db_path) as conn:
            eps, delta, n = conn.execute(
                "SELECT COALESCE(SUM(epsilon), 0), COALESCE(SUM(delta), 0), COUNT(*) FROM dp_spends"
                " WHERE peer = ? AND source = ?", (peer, source)).fetchone()
        return _balance(self.rules, float(eps), float(delta), int(n))

    def rows(self) -> list[LedgerRow]:
        """Every researcher's spending on every source, for the operator."""
        with _connect(self.db_path) as conn:
            found = conn.execute(
                "SELECT peer, source, MAX(dataset), SUM(epsilon), SUM(delta), COUNT(*), MAX(at) FROM dp_spends"
                " GROUP BY peer, source ORDER BY peer, source").fetchall()
        return [LedgerRow(peer=p, source=s, dataset=d, epsilon_spent=float(e), delta_spent=float(dl),
                          n_spends=int(n), last=str(at)) for p, s, d, e, dl, n, at in found]


def root_record(registry: Any, record: DatasetRecord) -> DatasetRecord:
    """The source dataset ``record`` was derived from on this node (``record`` itself for a source):
    whose budget a DP answer on ``record`` spends. A derived dataset whose source is gone spends
    from a budget of its own file's, as a source would."""
    root_id = record.metadata.get("root")
    if not root_id:
        return record
    try:
        root: DatasetRecord = registry.get(str(root_id))
    except Exception:
        return record
    return root
