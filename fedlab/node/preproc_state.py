"""Preprocessing states of a node, kept in its SQLite database so that a pipeline survives a restart.

A state is the dataset a pipeline started from and the chain of fitted transform specs so
far. States are immutable: each step makes a new one and names it in its reply, so a
researcher that repeats a step, or two pipelines that fork from one state, never see each
other's changes. A state holds node-local parameters (ComBat's batch estimates) that never
leave the node; what a researcher sees of it is its id.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedlab.errors import FedlabConfigError, FedlabDatasetError
from fedlab.node.registry import _connect, create_tables

__all__ = ["PreprocState", "PreprocStateStore"]

PreprocState = tuple[str, str, list[dict[str, Any]]]  # (preproc_id, dataset_id, chain)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS preproc_states (
    state_id    TEXT PRIMARY KEY,
    preproc_id  TEXT NOT NULL,
    dataset_id  TEXT NOT NULL,
    chain       TEXT NOT NULL,
    created_at  TEXT NOT NULL
)
"""


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (as a fit may leave in a spec) as JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"a transform spec holds a {type(value).__name__}, which cannot be stored")


class PreprocStateStore:
    """The ``preproc_states`` table of one node database (``DIR/node.db``), created if missing."""

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.db_path = Path(db_path).expanduser().resolve()
        create_tables(self.db_path, _SCHEMA)  # existing node directories gain the table here

    def new(self, preproc_id: str, dataset_id: str, chain: Sequence[Mapping[str, Any]]) -> str:
        """Store a state (one transaction) and return its new id."""
        state_id = "state-" + uuid.uuid4().hex[:16]
        try:
            text = json.dumps([dict(spec) for spec in chain], default=_plain, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise FedlabDatasetError(f"the preprocessing step cannot be stored on this node: {exc}") from exc
        with _connect(self.db_path) as conn, conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO preproc_states (state_id, preproc_id, dataset_id, chain, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (state_id, preproc_id, dataset_id, text, datetime.now(UTC).isoformat(timespec="seconds")),
            )
        return state_id

    def get(self, state_id: str, dataset_id: str | None = None) -> PreprocState:
        """The state ``state_id``; with ``dataset_id``, also check that it was made from that dataset."""
        with _connect(self.db_path) as conn:
            row = conn.execute(
                "SELECT preproc_id, dataset_id, chain FROM preproc_states WHERE state_id = ?", (state_id,)
            ).fetchone()
        if row is None:
            raise FedlabDatasetError(
                f"unknown preprocessing state {state_id!r} on this node; "
                "the pipeline must start again from its first step"
            )
        preproc_id, source, text = row
        if dataset_id is not None and source != dataset_id:
            raise FedlabDatasetError(
                f"preprocessing state {state_id!r} was made from dataset {source}, not {dataset_id}; "
                "send each node the state it returned for this dataset, or start the pipeline again"
            )
        try:
            chain = json.loads(text)
        except ValueError as exc:
            raise FedlabConfigError(
                f"preprocessing state {state_id!r} is damaged in {self.db_path} ({exc}); "
                "the pipeline must start again from its first step"
            ) from exc
        return preproc_id, source, chain
