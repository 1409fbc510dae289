"""ApprovalPanel: each node's decision on a training plan, flipping live as operators decide.

A plan runs on a node only after that node's operator approved its exact source, and the
operator does that on their own machine, in their own time. The panel shows, per node, the
state (Pending / Approved / Rejected / Not registered), the plan's hash and the exact command
the operator has to run, and a daemon thread re-asks the nodes (``check``, normally
``Experiment.check``) every ``poll_interval`` seconds until every node may run the plan,
setting the widgets' traits directly so the panel changes while other cells run.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import ipywidgets as w
import pandas as pd

__all__ = ["STATUS_COLOURS", "ApprovalPanel", "operator_command", "ready"]

STATUS_COLOURS = {"Approved": "green", "Pending": "darkorange", "Rejected": "red", "Not registered": "gray"}
_BACKTICKS = re.compile(r"`([^`]+)`")


def operator_command(message: Any) -> str:
    """The command quoted in a node's status message (``fedlab node plan approve DIR ID``), or ''."""
    found = _BACKTICKS.findall(message) if isinstance(message, str) else []
    return found[-1] if found else ""


def ready(record: Mapping[Any, Any]) -> bool:
    """Whether a node may run the plan: approved, or approval not required and not rejected."""
    status = record.get("status")
    return status == "Approved" or (record.get("approval_required") is False and status != "Rejected")


class _Row(w.HBox):
    def __init__(self, name: str) -> None:
        self.name = w.Label(name, layout=w.Layout(width="140px"))
        self.status = w.Label("checking", layout=w.Layout(width="120px"))
        self.plan = w.Label("", layout=w.Layout(width="120px"))
        self.command = w.Label("", layout=w.Layout(width="auto"))
        super().__init__([self.name, self.status, self.plan, self.command])

    def show(self, record: Mapping[Any, Any]) -> None:
        status = str(record.get("status") or "no reply")
        with self.status.hold_sync(), self.plan.hold_sync(), self.command.hold_sync():
            self.status.value = status
            self.status.style.text_color = STATUS_COLOURS.get(status, "red")
            self.status.style.font_weight = "bold"
            plan_id = record.get("plan_id")
            self.plan.value = str(plan_id)[:12] if isinstance(plan_id, str) else ""
            if ready(record):
                self.command.value = "may run" if status == "Approved" else "approval not required"
            else:
                self.command.value = operator_command(record.get("message")) or str(record.get("message") or "")
            self.command.tooltip = str(record.get("message") or "")  # the node's whole explanation


class ApprovalPanel(w.VBox):
    """Per-node approval of one plan, re-polled by a daemon thread until all nodes may run it."""

    def __init__(self, check: Callable[[], pd.DataFrame], poll_interval: float = 1.0, *, start: bool = True,
                 title: str = "plan approval") -> None:
        self.check = check
        self.poll_interval = float(poll_interval)
        self.title = title
        self.header = w.Label(f"{title}: checking the nodes")
        self.message = w.Label("")
        self.rows: dict[str, _Row] = {}
        super().__init__([self.header, self.message])
        self.frame: pd.DataFrame | None = None
        self.polls = 0
        self._stop = threading.Event()
        self._all_ready = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if start:
            self.poll()  # the first state shows as the panel is displayed, not a second later
            self.start()

    @property
    def approved(self) -> bool:
        """Every node may run the plan."""
        return self._all_ready.is_set()

    def start(self) -> None:
        if self._thread is None and not self._all_ready.is_set():
            self._thread = threading.Thread(target=self._loop, name="fedlab-approval-panel", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_interval) and not self._all_ready.is_set():
            self.poll()

    def poll(self) -> pd.DataFrame | None:
        """Ask the nodes once and show the answer; an error shows in the panel, polling goes on."""
        with self._lock:
            self.polls += 1
            try:
                frame = self.check()
            except Exception as exc:  # shown, not raised: this runs on a thread nobody waits on
                self.message.value = f"could not check the nodes ({type(exc).__name__}): {exc}"
                return None
            self.frame = frame
            self._show(frame)
            return frame

    def _show(self, frame: pd.DataFrame) -> None:
        records = frame.to_dict("records")
        added = False
        for record in records:
            key = str(record.get("node_id") or record.get("node"))
            if key not in self.rows:
                self.rows[key] = _Row(str(record.get("node") or key))
                added = True
            self.rows[key].show(record)
        if added:
            self.children = (self.header, *self.rows.values(), self.message)
        n_ready = sum(ready(r) for r in records)
        self.message.value = ""
        if records and n_ready == len(records):
            self.header.value = f"{self.title}: all {len(records)} nodes may run the plan"
            self._all_ready.set()
        else:
            stamp = time.strftime("%H:%M:%S")
            self.header.value = (f"{self.title}: {n_ready}/{len(records)} nodes may run the plan "
                                 f"(checked {stamp}, every {self.poll_interval:g} s)")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every node may run the plan (True) or ``timeout`` seconds pass (False)."""
        return self._all_ready.wait(timeout)

    def retire(self, note: str = "a newer panel for this plan replaces this one") -> None:
        """Stop polling after one last look, and say so: a frozen panel must not pass for a live one."""
        self.stop()
        if not self._all_ready.is_set():
            self.poll()
        if not self._all_ready.is_set():
            self.header.value += f"; no longer updated: {note}"

    def stop(self) -> None:
        """Stop polling; the panel keeps showing the last answer."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.poll_interval + 5)

    def close(self) -> None:
        """Stop polling and close the widget."""
        self._stop.set()
        super().close()
