"""Training rounds driven for a notebook: in the cell (foreground) or on a daemon thread.

Both ways run the same loop, ``run_rounds``: one ``Experiment.run_once`` per round, each
round's history rows handed to the progress panel (``round_done``) and, at the end, the
final validation the training arguments ask for (``Experiment.run(0)``) and ``finish``.
A background job runs that loop on a daemon thread so that the kernel stays free while the
panel keeps moving (its traits are set from the network thread; see progress.py).

Cancelling must not wait out a round that may last minutes: ``StopOnCancel`` is a request
policy that stops the round's request as soon as ``cancel()`` is called; the training job
then tells the nodes to stop (``TrainCancelRequest``) and the loop ends.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import pandas as pd

from fedlab.researcher.policies import NodeProgress, RequestPolicy, Verdict

if TYPE_CHECKING:
    from fedlab.researcher import Experiment

__all__ = ["JOB_COLUMNS", "BackgroundTraining", "StopOnCancel", "run_rounds"]

log = logging.getLogger("fedlab.notebook")
JOB_COLUMNS = ["job", "plan", "status", "round", "rounds", "nodes", "started", "seconds", "error"]


class StopOnCancel(RequestPolicy):
    """Stops the request in flight once ``event`` is set (checked at least every 0.5 s)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def check(self, started: float, now: float, nodes: dict[str, NodeProgress]) -> Verdict | None:
        return Verdict(self, stop=True) if self.event.is_set() else None

    def __repr__(self) -> str:
        return "a cancel from the notebook"


class Cancelled(Exception):  # noqa: N818 -- a state, not a fault
    """The job was cancelled between rounds."""


def _round_rows(experiment: Experiment, round_: int) -> pd.DataFrame:
    history = experiment.history
    return history[history["round"] == round_]


def run_rounds(experiment: Experiment, panel: Any = None, cancel: threading.Event | None = None) -> pd.DataFrame:
    """Run the experiment's remaining rounds, telling ``panel``; return the whole history.

    On any failure the panel shows the failed round and the reason, and the error propagates.
    """
    try:
        while experiment.round_current < experiment.rounds:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled after round {experiment.round_current}")
            try:
                rows = experiment.run_once()
            except BaseException:
                if panel is not None:
                    panel.round_done(_round_rows(experiment, experiment.round_current + 1))
                raise
            if panel is not None:
                panel.round_done(rows)
        experiment.run(0)  # the final validation-only round, when the training arguments ask for one
    except BaseException as exc:
        if panel is not None:
            cancelled = cancel is not None and cancel.is_set()
            panel.fail("cancelled" if cancelled else (" ".join(str(exc).split()) or type(exc).__name__))
        raise
    history = experiment.history
    if panel is not None:
        panel.finish(history)
    return history


class BackgroundTraining:
    """``experiment``'s remaining rounds on a daemon thread; ``status`` running, done, failed or cancelled."""

    def __init__(self, experiment: Experiment, panel: Any = None, *, name: str = "", plan: str = "",
                 start: bool = True) -> None:
        self.experiment = experiment
        self.panel = panel
        self.name = name or experiment.experiment_id
        self.plan = plan or experiment.plan_class
        self.status = "pending"
        self.error: str | None = None
        self.started: pd.Timestamp | None = None
        self._t0 = 0.0
        self._t1: float | None = None
        self._cancel = threading.Event()
        experiment.policies.append(StopOnCancel(self._cancel))
        self._thread = threading.Thread(target=self._run, name=f"fedlab-train-{self.name}", daemon=True)
        if start:
            self.start()

    def start(self) -> BackgroundTraining:
        if self.status == "pending":
            self.status = "running"
            self.started = pd.Timestamp.now(tz="UTC")
            self._t0 = time.monotonic()
            self._thread.start()
        return self

    def _run(self) -> None:
        try:
            run_rounds(self.experiment, self.panel, self._cancel)
            self.status = "done"
        except BaseException as exc:  # nobody joins this thread: everything ends up in status and error
            self.error = " ".join(str(exc).split()) or type(exc).__name__
            self.status = "cancelled" if self._cancel.is_set() else "failed"
            if self.status == "failed":
                log.warning("background training %s failed: %s", self.name, self.error)
        finally:
            self._t1 = time.monotonic()

    def cancel(self, wait: float | None = 30.0) -> bool:
        """Stop after (or in the middle of) the running round; True once the thread has ended."""
        self._cancel.set()
        return self.wait(wait)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends or ``timeout`` passes; True if it ended."""
        if self.status == "pending":
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def history(self) -> pd.DataFrame:
        """The rounds done so far (complete once ``status`` is done)."""
        return self.experiment.history

    @property
    def seconds(self) -> float:
        if self.status == "pending":
            return 0.0
        return (self._t1 if self._t1 is not None else time.monotonic()) - self._t0

    def summary(self) -> dict[str, Any]:
        exp = self.experiment
        return {"job": self.name, "plan": self.plan, "status": self.status, "round": exp.round_current,
                "rounds": exp.rounds, "nodes": len(exp.node_ids), "started": self.started,
                "seconds": round(self.seconds, 1), "error": self.error}

    def __repr__(self) -> str:
        exp = self.experiment
        return (f"BackgroundTraining({self.name}, {self.status}, round {exp.round_current}/{exp.rounds}"
                + (f", {self.error}" if self.error else "") + ")")
