"""Which training plans the node's operator allows to run, kept in the node's SQLite database.

A plan is identified by the sha256 of its source text, computed here from the source a
researcher sent (a hash from the network is never trusted): one byte changed is another plan
that needs its own decision. A researcher can only *ask* (``request`` inserts a Pending
record and never changes a decision); only the operator decides, through ``fedlab node plan
approve|reject``, in another process. A running node reads the table at every request and
caches nothing, so a decision takes effect at once (``check_allowed`` is that gate). Before
a decision, a plan's source is only parsed (``check_plan_source``), never executed. Same
connection, transaction and error rules as the dataset registry (see
:mod:`fedlab.node.registry`), in the same ``node.db``.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedlab.errors import FedlabApprovalError, FedlabConfigError, FedlabTrainingError
from fedlab.node.registry import _connect, create_tables
from fedlab.training.messages import APPROVED, NOT_REGISTERED, PENDING, REJECTED

__all__ = ["MAX_PENDING", "MIN_PREFIX", "ApprovalRegistry", "PlanRecord", "check_plan_source"]

MIN_PREFIX = 8
# A researcher cannot fill the operator's disk (or their review queue) with plans: past this
# many undecided plans, new requests are refused until the operator decides some.
MAX_PENDING = 200
_HEX = re.compile(r"^[0-9a-f]+$")
_UNREVIEWED = "recorded when it first ran; this node runs plans without approval (require_approval = false)"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS training_plans (
    plan_id       TEXT PRIMARY KEY,
    plan_class    TEXT NOT NULL,
    source        TEXT NOT NULL,
    description   TEXT NOT NULL DEFAULT '',
    researcher_id TEXT NOT NULL DEFAULT '',
    status        TEXT NOT NULL,
    requested_at  TEXT NOT NULL,
    decided_at    TEXT,
    note          TEXT NOT NULL DEFAULT ''
)
"""
_SELECT = (
    "SELECT plan_id, plan_class, source, description, researcher_id, status, requested_at, decided_at, note"
    " FROM training_plans"
)
_SELECT_ONE = _SELECT + " WHERE plan_id = ?"
_SELECT_ALL = _SELECT + " ORDER BY requested_at, plan_id"
_INSERT = (
    "INSERT INTO training_plans"
    " (plan_id, plan_class, source, description, researcher_id, status, requested_at, decided_at, note)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class PlanRecord:
    """One plan the node has been asked about, and the operator's decision (``status``)."""

    plan_id: str
    plan_class: str
    source: str
    description: str
    researcher_id: str
    status: str
    requested_at: str
    decided_at: str | None
    note: str = ""

    @property
    def short_id(self) -> str:
        """The first 12 hex characters: what the operator types (any unique prefix of >= 8 works)."""
        return self.plan_id[:12]

    @classmethod
    def _from_row(cls, row: sqlite3.Row | tuple[Any, ...]) -> PlanRecord:
        return cls(*row)


def check_plan_source(source: str, plan_class: str) -> None:
    """Parse ``source`` (never execute it) and check that it defines class ``plan_class``."""
    try:
        tree = ast.parse(source, filename="<training plan>")
    except SyntaxError as exc:
        where = f" at line {exc.lineno}" + (f": {exc.text.strip()!r}" if exc.text else "") if exc.lineno else ""
        raise FedlabTrainingError(f"the training plan is not valid Python: {exc.msg}{where}") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # null bytes, absurd nesting
        raise FedlabTrainingError(f"the training plan cannot be parsed: {type(exc).__name__}: {exc}") from None
    classes = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    if plan_class not in classes:
        found = ", ".join(classes) if classes else "none"
        raise FedlabTrainingError(
            f"the training plan's source defines no class {plan_class!r} at its top level (classes found: {found})"
        )


class ApprovalRegistry:
    """The ``training_plans`` table of one node database (``DIR/node.db``), created if missing."""

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.db_path = Path(db_path).expanduser().resolve()
        create_tables(self.db_path, _SCHEMA)  # existing node directories gain the table here

    @property
    def node_dir(self) -> Path:
        return self.db_path.parent

    def approve_command(self, plan_id: str) -> str:
        """The exact command the node's operator runs to approve ``plan_id``."""
        return f"fedlab node plan approve {shlex.quote(str(self.node_dir))} {plan_id[:12]}"

    # -- what a researcher can do: ask ---------------------------------------------------------
    def request(self, source: str, plan_class: str, description: str = "", researcher_id: str = "", *,
                limit: bool = True) -> PlanRecord:
        """Queue ``source`` for the operator's decision; return its record (new or as it was).

        An existing record is returned unchanged: asking again never resets a decision, and
        never replaces the description the operator already saw. ``limit=False`` skips the
        cap on undecided plans (for a node that runs plans without approval and only records
        them, so that its operator can see and reject them).
        """
        from fedlab.training.source import plan_id as hash_source

        pid = hash_source(source)
        with _connect(self.db_path) as conn, conn:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(_SELECT_ONE, (pid,)).fetchone()
            if row is not None:
                return PlanRecord._from_row(row)
            pending = conn.execute("SELECT count(*) FROM training_plans WHERE status = ?", (PENDING,)).fetchone()[0]
            if limit and pending >= MAX_PENDING:
                raise FedlabApprovalError(
                    f"this node already has {pending} training plans waiting for its operator's decision; "
                    "ask the operator to review them (`fedlab node plan list DIR`, then approve or reject) "
                    "before sending more"
                )
            record = PlanRecord(pid, plan_class, source, description, researcher_id, PENDING, _now(), None)
            conn.execute(
                _INSERT,
                (record.plan_id, record.plan_class, record.source, record.description, record.researcher_id,
                 record.status, record.requested_at, record.decided_at, record.note),
            )
        return record

    def status(self, plan_id: str) -> PlanRecord | None:
        """The record of exactly ``plan_id`` (a full sha256 hex), read now; None if never requested."""
        with _connect(self.db_path) as conn:
            row = conn.execute(_SELECT_ONE, (plan_id,)).fetchone()
        return None if row is None else PlanRecord._from_row(row)

    def list(self) -> list[PlanRecord]:
        """Every plan ever requested, oldest request first."""
        with _connect(self.db_path) as conn:
            rows = conn.execute(_SELECT_ALL).fetchall()
        return [PlanRecord._from_row(row) for row in rows]

    # -- what only the operator can do: decide ---------------------------------------------------
    def _find_id(self, conn: sqlite3.Connection, prefix: str) -> str:
        text = prefix.strip().lower() if isinstance(prefix, str) else ""
        listing = f"see `fedlab node plan list {shlex.quote(str(self.node_dir))}`"
        if len(text) < MIN_PREFIX or not _HEX.match(text):
            raise FedlabConfigError(
                f"{prefix!r} is not a plan id: give at least {MIN_PREFIX} hexadecimal characters of it ({listing})"
            )
        rows = conn.execute(
            "SELECT plan_id FROM training_plans WHERE substr(plan_id, 1, ?) = ? ORDER BY plan_id",
            (len(text), text),
        ).fetchall()
        if not rows:
            raise FedlabConfigError(f"no training plan {text} on this node ({listing})")
        if len(rows) > 1:
            ids = ", ".join(row[0][: len(text) + 4] for row in rows)
            raise FedlabConfigError(
                f"plan id prefix {text} matches {len(rows)} plans ({ids}); give more characters of it"
            )
        return str(rows[0][0])

    def find(self, prefix: str) -> PlanRecord:
        """The one plan whose id starts with ``prefix`` (>= 8 hex characters, or the full id)."""
        with _connect(self.db_path) as conn:
            row = conn.execute(_SELECT_ONE, (self._find_id(conn, prefix),)).fetchone()
        return PlanRecord._from_row(row)

    def _decide(self, prefix: str, status: str, note: str) -> PlanRecord:
        if not isinstance(note, str) or len(note) > 65536:
            raise FedlabConfigError("the note must be text of at most 65536 characters")
        with _connect(self.db_path) as conn, conn:
            conn.execute("BEGIN IMMEDIATE")
            pid = self._find_id(conn, prefix)
            conn.execute(
                "UPDATE training_plans SET status = ?, decided_at = ?, note = ? WHERE plan_id = ?",
                (status, _now(), note, pid),
            )
            row = conn.execute(_SELECT_ONE, (pid,)).fetchone()
        return PlanRecord._from_row(row)

    def approve(self, plan_id: str, note: str = "") -> PlanRecord:
        """Allow the plan (full id or unique prefix) to run on this node, from its next request on."""
        return self._decide(plan_id, APPROVED, note)

    def reject(self, plan_id: str, note: str = "") -> PlanRecord:
        """Refuse the plan from its next request on (also when the node does not require approval)."""
        return self._decide(plan_id, REJECTED, note)

    # -- the gate: may this plan run now? --------------------------------------------------------
    def explain(self, plan_id: str, plan_class: str, record: PlanRecord | None, *, node: str,
                require_approval: bool) -> str:
        """What the plan's status means for the researcher, with the operator's exact command."""
        command = self.approve_command(plan_id)
        short = plan_id[:12]
        status = record.status if record is not None else NOT_REGISTERED
        if status == APPROVED:
            return f"plan {short} ({plan_class}) is approved on node {node}; it may run"
        note = f" (note: {record.note})" if record is not None and record.note else ""
        if status == REJECTED:
            return (f"the operator of node {node} rejected plan {short} ({plan_class}){note}; it will not "
                    f"run there unless they change their mind with `{command}`")
        if not require_approval:
            return (f"node {node} does not require approval: plan {short} ({plan_class}) may run unless "
                    f"its operator rejects it")
        if status == PENDING:
            return (f"plan {short} ({plan_class}) is waiting for the decision of the operator of node "
                    f"{node}; they approve it with `{command}`")
        return (f"plan {short} ({plan_class}) is not registered on node {node}: send an approval "
                f"request first, then its operator approves it with `{command}`")

    def check_allowed(self, source: str, plan_class: str, *, node: str, require_approval: bool,
                      researcher_id: str = "") -> str:
        """The plan's id if it may run now; FedlabApprovalError saying what the operator must do if not.

        Read from the database at every call: a decision made a moment ago applies. On a node
        that does not require approval, a plan never seen before is recorded (as Pending)
        before it runs, so that its operator can find it in `fedlab node plan list` and reject it.
        """
        from fedlab.training.source import plan_id as hash_source

        plan_id = hash_source(source)
        record = self.status(plan_id)
        if record is None and not require_approval:
            record = self.request(source, plan_class, _UNREVIEWED, researcher_id, limit=False)
        status = record.status if record is not None else NOT_REGISTERED
        if not (status == APPROVED or (not require_approval and status != REJECTED)):
            raise FedlabApprovalError(
                f"training plan {plan_id} is {status} on node {node}, so it may not run there. "
                + self.explain(plan_id, plan_class, record, node=node, require_approval=require_approval))
        if record is not None and require_approval and record.plan_class != plan_class:
            raise FedlabApprovalError(
                f"training plan {plan_id} was approved on node {node} to run its class "
                f"{record.plan_class!r}, not {plan_class!r}; send plan_class={record.plan_class!r}")
        return plan_id
