"""TrainingProgress: one live row per node while an experiment trains.

Events arrive on the researcher's network thread (``Experiment(on_progress=panel.on_event)``)
while the kernel may be busy with another cell. Measured in JupyterLab: a thread that sets
widget traits directly keeps the bars moving; handing updates to the kernel's event loop
freezes them until the busy cell ends. So the panel sets traits from whichever thread calls
it, keeps only the latest event per node, and flushes at most ``1 / min_interval`` times a
second (a trailing timer makes sure the last event always shows), each row's widgets batched
with ``hold_sync``.

A bar spans the whole experiment: ``STEPS`` units per round, filled within a round by the
training iterations the node reports. ``round_done`` settles each node's part of a round (a
node that failed or did not answer turns red with the reason); ``finish`` turns the bars
green and leaves the history and the loss plot as static output for the saved notebook.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Mapping
from typing import Any

import ipywidgets as w
import pandas as pd

from fedlab.notebook.display import append

__all__ = ["NodeRow", "TrainingProgress", "format_elapsed"]

STEPS = 100  # bar units per round


def format_elapsed(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest:02d} s"


class NodeRow(w.HBox):
    """name · state · bar · where (round/epoch/iteration) · loss · elapsed"""

    def __init__(self, name: str, rounds: int) -> None:
        self.name = w.Label(name, layout=w.Layout(width="140px"))
        self.state = w.Label("waiting", layout=w.Layout(width="220px"))
        self.bar = w.IntProgress(value=0, min=0, max=rounds * STEPS, layout=w.Layout(width="260px"))
        self.where = w.Label("", layout=w.Layout(width="250px"))
        self.loss = w.Label("", layout=w.Layout(width="110px"))
        self.elapsed = w.Label("", layout=w.Layout(width="90px"))
        super().__init__([self.name, self.state, self.bar, self.where, self.loss, self.elapsed])
        self.started: float | None = None
        self.failed_rounds: list[int] = []

    def parts(self) -> tuple[w.Widget, ...]:
        return (self.state, self.bar, self.where, self.loss, self.elapsed)


class TrainingProgress(w.VBox):
    """Live per-node progress of a training run; thread-safe ``on_event``/``round_done``/``finish``/``fail``."""

    def __init__(self, node_names: Mapping[str, str], rounds: int, *, min_interval: float = 0.1,
                 title: str = "federated training") -> None:
        self.rounds = int(rounds)
        self.min_interval = float(min_interval)
        self.title = title
        self.header = w.Label(f"{title}: starting, {self.rounds} rounds")
        self.output = w.Output()
        self.rows: dict[str, NodeRow] = {n: NodeRow(name, self.rounds) for n, name in node_names.items()}
        super().__init__([self.header, *self.rows.values(), self.output])
        self.status = "running"  # running, done or failed
        self.rounds_done = 0
        self.events = 0  # every event received, flushed or not (for tests and curiosity)
        self.flushes = 0
        self._t0 = time.monotonic()
        self._lock = threading.RLock()
        self._pending: dict[str, Any] = {}
        self._last_flush = -float("inf")
        self._timer: threading.Timer | None = None

    # -- rows ------------------------------------------------------------------------------------
    def _row(self, node_id: str, name: str | None = None) -> NodeRow:
        row = self.rows.get(node_id)
        if row is None:  # a node the panel was not told about: show it rather than drop its events
            row = self.rows[node_id] = NodeRow(name or node_id, self.rounds)
            self.children = (self.header, *self.rows.values(), self.output)
        return row

    def _elapsed(self, row: NodeRow) -> str:
        return format_elapsed(time.monotonic() - (row.started if row.started is not None else self._t0))

    # -- live events -------------------------------------------------------------------------------
    def on_event(self, node_id: str, progress: Any) -> None:
        """A ``TrainProgress`` from ``node_id``; called on the network thread, returns at once."""
        with self._lock:
            self.events += 1
            if self.status != "running":
                return
            self._pending[node_id] = progress
            wait = self._last_flush + self.min_interval - time.monotonic()
            if wait <= 0:
                self._flush_locked()
            elif self._timer is None:
                self._timer = threading.Timer(wait, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        """Show the pending events now (the trailing timer calls this)."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        self._last_flush = time.monotonic()
        if not pending:
            return
        self.flushes += 1
        for node_id, p in pending.items():
            row = self._row(node_id)
            if row.started is None:
                row.started = time.monotonic()
            with contextlib.ExitStack() as stack:
                for part in row.parts():
                    stack.enter_context(part.hold_sync())
                self._show(row, p)

    def _show(self, row: NodeRow, p: Any) -> None:
        round_ = min(max(int(p.round), 1), self.rounds)
        if row.bar.bar_style == "danger" and p.round > max(row.failed_rounds, default=0):
            row.bar.bar_style = ""  # the node is back in a later round
        missed = f" (missed round {', '.join(map(str, row.failed_rounds))})" if row.failed_rounds else ""
        row.state.value = ("training" if p.phase == "training" else p.phase.replace("validation", "validating")) \
            + missed
        # the validation-only request after the last round carries round R + 1: say what it is
        parts = [f"round {p.round}/{self.rounds}" if p.round <= self.rounds else "final validation"]
        if p.n_epochs:
            parts.append(f"epoch {p.epoch}/{p.n_epochs}")
        if p.n_iterations:
            parts.append(f"it {p.iteration}/{p.n_iterations}")
        row.where.value = " · ".join(parts)
        if p.loss is not None:
            row.loss.value = f"loss {p.loss:.4g}"
        if p.phase == "training" and p.n_iterations:
            value = (round_ - 1) * STEPS + int(STEPS * min(p.iteration, p.n_iterations) / p.n_iterations)
            row.bar.value = min(value, row.bar.max)
        row.elapsed.value = self._elapsed(row)

    # -- round and run ends --------------------------------------------------------------------------
    def round_done(self, rows: pd.DataFrame) -> None:
        """Settle one round from its history rows: ok advances the bar, error/missing turns it red."""
        with self._lock:
            self._flush_locked()
            rounds = [int(r) for r in rows.get("round", pd.Series(dtype="int64"))]
            for record in rows.to_dict("records"):
                if record.get("kind", "training") != "training":
                    continue
                row = self._row(str(record["node_id"]), str(record.get("node") or record["node_id"]))
                round_ = int(record["round"])
                with contextlib.ExitStack() as stack:
                    for part in row.parts():
                        stack.enter_context(part.hold_sync())
                    if record["status"] == "ok":
                        row.bar.value = min(round_ * STEPS, row.bar.max)
                        secure = "n_samples" in record and pd.isna(record["n_samples"])  # hidden: secure round
                        row.state.value = f"round {round_} done" + (", secure (masked)" if secure else "")
                        if pd.notna(record.get("train_loss")):
                            row.loss.value = f"loss {record['train_loss']:.4g}"
                    else:
                        row.failed_rounds.append(round_)
                        row.bar.bar_style = "danger"
                        row.state.value = f"{record['status']} in round {round_}: {record.get('reason') or ''}"
                        row.state.tooltip = row.state.value  # the reason may be longer than the label
                    row.elapsed.value = self._elapsed(row)
            if rounds:
                self.rounds_done = max(self.rounds_done, max(rounds))
                self.header.value = f"{self.title}: round {self.rounds_done}/{self.rounds} done"

    def finish(self, history: pd.DataFrame | None = None) -> None:
        """The run ended well: green bars, and the history and loss plot as static output."""
        with self._lock:
            self._flush_locked()
            self.status = "done"
            last_failed = set()
            if history is not None and len(history):
                training = history[history["kind"] == "training"] if "kind" in history else history
                if len(training):
                    last = training[training["round"] == training["round"].max()]
                    last_failed = set(last.loc[last["status"] != "ok", "node_id"].astype(str))
                    self.rounds_done = int(training["round"].max())
            for node_id, row in self.rows.items():
                with contextlib.ExitStack() as stack:
                    for part in row.parts():
                        stack.enter_context(part.hold_sync())
                    if node_id in last_failed:
                        row.bar.bar_style = "danger"
                        continue
                    row.bar.value = row.bar.max
                    row.bar.bar_style = "success"
                    row.state.value = "done" + (f" (missed round {', '.join(map(str, row.failed_rounds))})"
                                                if row.failed_rounds else "")
                    row.elapsed.value = self._elapsed(row)
            self.header.value = (f"{self.title}: done, {self.rounds_done}/{self.rounds} rounds in "
                                 f"{format_elapsed(time.monotonic() - self._t0)}")
        if history is not None and len(history):
            from fedlab.notebook.plots import loss_figure

            append(self.output, history, loss_figure(history))

    def fail(self, message: str) -> None:
        """The run stopped (an error, or cancelled): unfinished bars turn red, the reason shows."""
        with self._lock:
            self._flush_locked()
            self.status = "failed"
            for row in self.rows.values():
                if row.bar.bar_style != "success":
                    with row.bar.hold_sync(), row.state.hold_sync():
                        row.bar.bar_style = "danger"
                        if not row.state.value.startswith(("error", "missing")):
                            row.state.value = "stopped"
            self.header.value = f"{self.title}: stopped after {self.rounds_done}/{self.rounds} rounds: {message}"
        append(self.output, message, stream="stderr")
