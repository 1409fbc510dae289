"""What a node keeps between training rounds, in its SQLite database: optimizer state, Scaffold's
control variates. Such state never leaves the node; the researcher holds only its id.

A state is an opaque blob made by :func:`fedlab.training.state.encode_state` (raw array bytes
plus a JSON header, never a pickle) with the experiment and dataset it belongs to. States are
immutable: every round stores a new one and names it in its reply, so repeating a round (from
a breakpoint, say) starts again from exactly the state it started from the first time.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

from fedlab.errors import FedlabTrainingError
from fedlab.node.registry import _connect

__all__ = ["StateStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS training_states (
    state_id      TEXT PRIMARY KEY,
    experiment_id TEXT NOT NULL,
    dataset_id    TEXT NOT NULL,
    blob          BLOB NOT NULL,
    created_at    TEXT NOT NULL
)
"""

class StateStore:
    """The ``training_states`` table of one node database (``DIR/node.db``), created if missing."""

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.db_path = Path(db_path).expanduser().resolve()
        with _connect(self.db_path) as conn, conn:  # existing node directories gain the table here
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_SCHEMA)

    def put(self, blob: bytes, experiment_id: str, dataset_id: str = "") -> str:
        """Store a state (one transaction) and return its new id (uuid4 hex)."""
        state_id = uuid.uuid4().hex
        with _connect(self.db_path) as conn, conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO training_states (state_id, experiment_id, dataset_id, blob, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (state_id, experiment_id, dataset_id, bytes(blob), datetime.now(UTC).isoformat(timespec="seconds")),
            )
        return state_id

    def get(self, state_id: str, *, experiment_id: str | None = None, dataset_id: str | None = None) -> bytes:
        """The blob of ``state_id``; with ``experiment_id``/``dataset_id``, check it belongs to them."""
        with _connect(self.db_path) as conn:
            row = conn.execute(
                "SELECT blob, experiment_id, dataset_id FROM training_states WHERE state_id = ?", (state_id,)
            ).fetchone()
        if row is None:
            raise FedlabTrainingError(
                f"training state {state_id!r} is unknown on this node (it was made by another node, "
                "or the node's database was replaced); send this node the state_id it returned in its "
                "last reply for this experiment, or start the round without a state (state_id=None)"
            )
        blob, owner, source = row
        if experiment_id is not None and owner != experiment_id:
            raise FedlabTrainingError(
                f"training state {state_id!r} belongs to experiment {owner!r}, not {experiment_id!r}; "
                "send each experiment the state its own last round returned"
            )
        if dataset_id is not None and source and source != dataset_id:
            raise FedlabTrainingError(
                f"training state {state_id!r} was made on dataset {source}, not {dataset_id}; "
                "send each node the state it returned for this dataset"
            )
        return bytes(blob)

    def forget(self, experiment_id: str) -> int:
        """Delete every state of ``experiment_id``; return how many there were."""
        with _connect(self.db_path) as conn, conn:
            conn.execute("BEGIN IMMEDIATE")
            cursor = conn.execute("DELETE FROM training_states WHERE experiment_id = ?", (experiment_id,))
        return int(cursor.rowcount)
