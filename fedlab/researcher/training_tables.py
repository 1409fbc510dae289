"""The tables a researcher reads about training: the plan's status per node and the history.

Kept apart from the experiment so that its records stay plain JSON-able dicts (they go into
breakpoints as they are) and the DataFrame layout is decided in one place. A node that did
not answer is a row too, saying so: nothing is silently partial.

A node that refused a round under its own privacy rules (its budget spent, ``require_dp``) is a row of
status ``refused`` whose ``reason`` is the node's. When a round was trained with differential
privacy, the history has four more columns per node and round: ``epsilon`` and ``delta`` (what the
round spent on the node's budget), ``epsilon_spent`` and ``epsilon_remaining`` (this researcher's
balance on that dataset afterwards, over everything it asked there). The ε of an experiment's rounds
on one node add up to their composed ε (the node's RDP accountant spends only the increase).

``device`` says where each round trained (``"cpu"``, ``"cuda:0"``; empty for a node that did not answer,
or an older one that does not say). When a round did not train where ``use_gpu`` asked (a node without a
GPU, or one whose operator set its device, see docs/gpu.md), the node's note is in a ``device_note``
column, there only when some round has one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from fedlab.researcher.jobs import Job
from fedlab.researcher.training_jobs import NodeRound
from fedlab.training.messages import TrainingPlanStatusReply

__all__ = ["DEVICE_NOTE_COLUMNS", "DP_COLUMNS", "HISTORY_COLUMNS", "PRIVACY_COLUMNS", "STATUS_COLUMNS",
           "history_frame", "history_row", "privacy_frame", "status_frame"]

STATUS_COLUMNS = ["node_id", "node", "status", "approval_required", "plan_id", "message"]
HISTORY_COLUMNS = ["round", "kind", "node_id", "node", "status", "reason", "n_samples", "n_test_samples",
                   "n_updates", "train_loss", "device"]
TIMING_COLUMNS = ["total_seconds", "compute_seconds"]
DP_COLUMNS = ["epsilon", "delta", "epsilon_spent", "epsilon_remaining"]
DEVICE_NOTE_COLUMNS = ["device_note"]
_INT_COLUMNS = ("round", "n_samples", "n_test_samples", "n_updates")


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
        "epsilon": result.epsilon, "delta": result.delta, "epsilon_spent": result.epsilon_spent,
        "epsilon_remaining": result.epsilon_remaining, "device": result.device, "device_note": result.device_note,
    }


def history_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The records as a DataFrame, metrics spread into ``global_<name>`` and ``local_<name>`` columns, the
    DP columns when some round spent ε, and ``device_note`` when some round has one.

    Built column by column (not from one dict per row, which pandas reads twice as slowly): a notebook's
    background loop asks for each round's rows."""
    records = list(records)
    if not records:
        return pd.DataFrame([], columns=HISTORY_COLUMNS + TIMING_COLUMNS).astype(dict.fromkeys(_INT_COLUMNS, "int64"))
    dp = DP_COLUMNS if any(r.get("epsilon") is not None for r in records) else []
    notes = DEVICE_NOTE_COLUMNS if any(r.get("device_note") for r in records) else []
    data: dict[str, Any] = {c: [r.get(c) for r in records] for c in HISTORY_COLUMNS + notes + dp + TIMING_COLUMNS}
    data["device"] = [v or "" for v in data["device"]]  # records kept before devices were reported
    if notes:
        data["device_note"] = [v or "" for v in data["device_note"]]
    metrics: dict[str, list[Any]] = {}
    for i, record in enumerate(records):
        for prefix, key in (("global_", "metrics_before"), ("local_", "metrics_after")):
            for name, value in (record.get(key) or {}).items():
                metrics.setdefault(prefix + name, [np.nan] * len(records))[i] = value
    data.update(metrics)
    for column in _INT_COLUMNS:  # n_samples is None where secure aggregation hid it: shown as <NA>
        values = data[column]
        missing = any(v is None or v != v for v in values)
        data[column] = pd.array(values, dtype="Int64") if missing else np.asarray(values, dtype="int64")
    ordered = sorted(metrics, key=lambda c: (not c.startswith("global_"), c))
    return pd.DataFrame(data, columns=HISTORY_COLUMNS + notes + dp + ordered + TIMING_COLUMNS)


PRIVACY_COLUMNS = ["node", "dp_rounds", "epsilon", "delta", "epsilon_spent", "epsilon_remaining", "last_status",
                   "last_reason"]


def privacy_frame(records: Iterable[Mapping[str, Any]], node_ids: Iterable[str], names: Mapping[str, str]
                  ) -> pd.DataFrame:
    """Per node: the DP rounds it trained in this experiment, the ε and δ they spent together (their
    composed ε, as the node's accountant spends only its increase), this researcher's balance on the node
    after the last of them, and its last training round's status and reason (a refusal says why)."""
    records = [r for r in records if r.get("kind") == "training"]
    rows = []
    for node_id in node_ids:
        mine = [r for r in records if r.get("node_id") == node_id]
        paid = [r for r in mine if r.get("epsilon") is not None]
        last = mine[-1] if mine else {}
        rows.append({"node": names.get(node_id, node_id), "dp_rounds": len(paid),
                     "epsilon": sum(float(r["epsilon"]) for r in paid),
                     "delta": sum(float(r.get("delta") or 0.0) for r in paid),
                     "epsilon_spent": paid[-1].get("epsilon_spent") if paid else None,
                     "epsilon_remaining": paid[-1].get("epsilon_remaining") if paid else None,
                     "last_status": last.get("status"), "last_reason": last.get("reason", "")})
    return pd.DataFrame(rows, columns=PRIVACY_COLUMNS).set_index("node")
