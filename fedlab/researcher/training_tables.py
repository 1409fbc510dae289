"""The tables a researcher reads about training: the plan's status per node and the history.

Kept apart from the experiment so that its records stay plain JSON-able dicts (they go into
breakpoints as they are) and the DataFrame layout is decided in one place. A node that did
not answer is a row too, saying so: nothing is silently partial.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from fedlab.researcher.jobs import Job
from fedlab.researcher.training_jobs import NodeRound
from fedlab.training.messages import TrainingPlanStatusReply

__all__ = ["HISTORY_COLUMNS", "STATUS_COLUMNS", "history_frame", "history_row", "status_frame"]

STATUS_COLUMNS = ["node_id", "node", "status", "approval_required", "plan_id", "message"]
HISTORY_COLUMNS = ["round", "kind", "node_id", "node", "status", "reason", "n_samples", "n_test_samples",
                   "n_updates", "train_loss"]
TIMING_COLUMNS = ["total_seconds", "compute_seconds"]


def status_frame(replies: Mapping[str, TrainingPlanStatusReply], job: Job, node_ids: Iterable[str],
                 names: Mapping[str, str]) -> pd.DataFrame:
    """One row per node asked: the plan's status there, or why the node gave none."""
    rows = []
    for node_id in node_ids:
        row: dict[str, Any] = {"node_id": node_id, "node": names.get(node_id, node_id)}
        reply = replies.get(node_id)
        if reply is not None:
            row.update(status=reply.status, approval_required=reply.approval_required, plan_id=reply.plan_id,
                       message=reply.message)
        elif node_id in job.errors:
            error = job.errors[node_id]
            row.update(status="error", approval_required=None, plan_id=None, message=f"[{error.code}] {error.message}")
        else:
            why = job.missing.get(node_id)
            row.update(status="no reply", approval_required=None, plan_id=None,
                       message=str(why) if why is not None else "the node did not answer")
        rows.append(row)
    return pd.DataFrame(rows, columns=STATUS_COLUMNS)


def history_row(round_: int, kind: str, node_id: str, node: str, result: NodeRound) -> dict[str, Any]:
    """A JSON-able record of one node's part in one round (``kind``: training or validation)."""
    return {
        "round": round_, "kind": kind, "node_id": node_id, "node": node, "status": result.status,
        "reason": result.reason, "n_samples": result.n_samples, "n_test_samples": result.n_test_samples,
        "n_updates": result.n_updates, "train_loss": result.train_loss,
        "metrics_before": dict(result.metrics_before), "metrics_after": dict(result.metrics_after),
        "total_seconds": result.total_seconds, "compute_seconds": result.compute_seconds,
    }


def history_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The records as a DataFrame, metrics spread into ``global_<name>`` and ``local_<name>`` columns."""
    rows: list[dict[str, Any]] = []
    metric_columns: dict[str, None] = {}
    for record in records:
        row = {k: record.get(k) for k in HISTORY_COLUMNS + TIMING_COLUMNS}
        for prefix, key in (("global_", "metrics_before"), ("local_", "metrics_after")):
            for name, value in (record.get(key) or {}).items():
                row[prefix + name] = value
                metric_columns[prefix + name] = None
        rows.append(row)
    ordered = sorted(metric_columns, key=lambda c: (not c.startswith("global_"), c))
    frame = pd.DataFrame(rows, columns=HISTORY_COLUMNS + ordered + TIMING_COLUMNS)
    for column in ("round", "n_samples", "n_test_samples", "n_updates"):
        # n_samples is None where secure aggregation hid it: shown as <NA>
        frame[column] = frame[column].astype("Int64" if frame[column].isna().any() else "int64")
    return frame
