"""The training form: pick a plan and the data, ask for approval, train with live progress.

It does what ``%fed approve NAME`` and ``%fed train NAME ... --background`` do, through the
same pieces: the session's ``approval``/``experiment`` (when the session has them: a plain
object with ``researcher`` and ``plans`` works too), the ``ApprovalPanel``, and the rounds
driven by ``fedlab.notebook.background`` (``run_rounds``; on the button, a ``BackgroundTraining``
job that ``%fed jobs`` lists and ``%fed cancel`` stops). The panels appear inside the form,
their box's ``children`` set from the worker thread.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import ipywidgets as w
import pandas as pd

from fedlab.notebook.approval import ApprovalPanel
from fedlab.notebook.background import BackgroundTraining, StopOnCancel, run_rounds
from fedlab.notebook.forms import Form, fed_line
from fedlab.notebook.progress import TrainingProgress
from fedlab.researcher.aggregators import AGGREGATORS
from fedlab.training.source import plan_id, plan_source

__all__ = ["TrainForm"]

# every registered rule: FedAvg first, then FedProx, Scaffold, the server optimizers, the robust ones
AGGREGATOR_NAMES = tuple(AGGREGATORS)


class TrainForm(Form):
    """Plan, tags, rounds, aggregator and training arguments; Approve and Train buttons."""

    submit_label = "Train"

    def __init__(self, session: Any) -> None:
        super().__init__(session, "federated training")
        self.plan = w.Dropdown(description="plan", options=sorted(getattr(session, "plans", {}) or {}))
        self.rounds = w.BoundedIntText(value=3, min=1, max=10_000, description="rounds")
        self.aggregator = w.Dropdown(description="aggregator", options=AGGREGATOR_NAMES, value="fedavg")
        self.epochs = w.BoundedIntText(value=1, min=1, max=10_000, description="epochs")
        self.batch_size = w.BoundedIntText(value=32, min=1, max=1_000_000, description="batch size")
        self.lr = w.BoundedFloatText(value=0.01, min=0.0, max=100.0, step=0.001, description="lr")
        self.model_args = w.Text(value="{}", description="model args", placeholder='{"n_features": 30}')
        self.extra_args = w.Text(value="{}", description="more args", placeholder='{"test_ratio": 0.2}')
        self.approve_button = w.Button(description="Ask approval")
        self.cancel_button = w.Button(description="Cancel", disabled=True)
        self.panels = w.VBox([])
        self.approval: ApprovalPanel | None = None
        self.progress: TrainingProgress | None = None
        self.experiment: Any = None
        self.plan_id = ""
        self.job: BackgroundTraining | None = None
        self._cancel = threading.Event()
        self.approve_button.on_click(lambda _: self.start_approval())
        self.cancel_button.on_click(lambda _: self.cancel())
        self._watch(self.tags, self.plan, self.rounds, self.aggregator, self.epochs, self.batch_size, self.lr,
                    self.model_args, self.extra_args)
        self._layout(w.HBox([self.plan, self.rounds, self.aggregator]),
                     w.HBox([self.epochs, self.batch_size, self.lr]), w.HBox([self.model_args, self.extra_args]),
                     w.HBox([self.approve_button, self.cancel_button]), self.panels)
        self.refresh()
        self.update_command()

    def refresh(self) -> None:
        """Reload the datasets, and the plans (a %%fed plan cell run after the form was made)."""
        super().refresh()
        if hasattr(self, "plan"):
            current = self.plan.value
            self.plan.options = sorted(getattr(self.session, "plans", {}) or {})
            if current in self.plan.options:
                self.plan.value = current

    # -- what the widgets say ----------------------------------------------------------------------
    def _json(self, widget: w.Text, what: str) -> dict[str, Any]:
        try:
            value = json.loads(widget.value or "{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what} must be a JSON object, e.g. {widget.placeholder}: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError(f"{what} must be a JSON object, e.g. {widget.placeholder}")
        return value

    def training_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"epochs": self.epochs.value, "batch_size": self.batch_size.value,
                                "optimizer_args": {"lr": self.lr.value}}
        args.update(self._json(self.extra_args, "more args"))
        return args

    def commands(self) -> list[str]:
        name = self.plan.value or "PLAN"
        tags = list(self.tags.value) or ["TAG"]
        try:
            model_args, training_args = self._json(self.model_args, "model args"), self.training_args()
        except ValueError as exc:
            return [f"(fix the arguments: {exc})"]
        extra = ["--model-args", json.dumps(model_args)] if model_args else []
        return [fed_line("approve", name, "--tags", *tags),
                fed_line("train", name, "--tags", *tags, "--rounds", self.rounds.value, "--aggregator",
                         self.aggregator.value, *extra, "--training-args", json.dumps(training_args), "--background")]

    def _plan(self) -> tuple[str, str, str]:
        plans = getattr(self.session, "plans", {}) or {}
        if self.plan.value not in plans:
            raise ValueError("define a plan first (a %%fed plan NAME cell), then pick it here")
        source, class_name = plans[self.plan.value]
        return self.plan.value, source, class_name

    def _new_experiment(self) -> Any:
        name, source, class_name = self._plan()
        tags = self._selected_tags()
        kwargs = {"rounds": self.rounds.value, "aggregator": self.aggregator.value,
                  "model_args": self._json(self.model_args, "model args"), "training_args": self.training_args()}
        self.status.value = "searching..."
        if hasattr(self.session, "experiment"):  # fedlab.notebook.Session: the plan as %%fed plan stored it
            self.experiment = self.session.experiment(name, tags, **kwargs)
            self.session.experiments[name] = self.experiment
        else:
            self.experiment = self.session.researcher.experiment(tags, source, plan_class=class_name, **kwargs)
        return self.experiment

    # -- approval -----------------------------------------------------------------------------------
    def approve(self) -> ApprovalPanel:
        """Send the plan to every node for approval and show the live approval panel."""
        name, source, class_name = self._plan()
        tags = self._selected_tags()
        self.status.value = "asking the nodes..."
        if hasattr(self.session, "approval"):
            approval: Any = self.session.approval(name, tags)  # no model built: model args may be unknown yet
        else:
            approval = self._new_experiment()
        approval.approve(f"{name} from the fedlab training form")
        panel = ApprovalPanel(approval.check, title=f"approval of {name}")
        if hasattr(self.session, "set_panel"):
            self.session.set_panel(name, panel)  # the panel it replaces stops polling
        elif self.approval is not None:
            self.approval.stop()
        self.approval = panel
        self.plan_id = plan_id(plan_source(source, class_name)[0])  # the hash the nodes show
        self.panels.children = [p for p in (panel, self.progress) if p is not None]
        self.status.value = f"approval asked on {len(approval.node_ids)} nodes (plan {self.plan_id[:12]})"
        return panel

    def start_approval(self) -> threading.Thread:
        self.thread = threading.Thread(target=self._guarded, args=(self.approve,), daemon=True,
                                       name="fedlab-approval-form")
        self.thread.start()
        return self.thread

    # -- training -----------------------------------------------------------------------------------
    def _prepare(self) -> tuple[Any, TrainingProgress]:
        experiment = self._new_experiment()
        names = experiment.researcher._names()
        self.progress = TrainingProgress({n: names.get(n, n) for n in experiment.node_ids}, experiment.rounds,
                                         title=f"training {self.plan.value}")
        experiment.on_progress = self.progress.on_event
        if isinstance(getattr(self.session, "progress", None), dict):
            self.session.progress[self.plan.value] = self.progress
        self.panels.children = [p for p in (self.approval, self.progress) if p is not None]
        self.status.value = f"training {experiment.plan_class} on {len(experiment.node_ids)} nodes"
        return experiment, self.progress

    def submit(self) -> pd.DataFrame:
        """Train here, on the calling thread, with the form's settings; the history when it ends."""
        experiment, panel = self._prepare()
        self._cancel = threading.Event()
        experiment.policies.append(StopOnCancel(self._cancel))  # Cancel stops the round in flight
        self.cancel_button.disabled = False
        try:
            self.result = run_rounds(experiment, panel, self._cancel)
        finally:
            self.cancel_button.disabled = True
        self.status.value = f"{panel.status}: {experiment.round_current}/{experiment.rounds} rounds"
        return self.result

    def start(self) -> threading.Thread:
        """What Train does: a background job (listed by ``%fed jobs``) that this thread waits for."""
        self.thread = threading.Thread(target=self._guarded, args=(self._train_job,), daemon=True,
                                       name="fedlab-train-form")
        self.thread.start()
        return self.thread

    def _train_job(self) -> None:
        experiment, panel = self._prepare()
        plan = self.plan.value
        jobs = getattr(self.session, "jobs", None)
        name = self.session.new_job_name(plan) if hasattr(self.session, "new_job_name") else ""
        self.job = BackgroundTraining(experiment, panel, name=name, plan=plan)
        if isinstance(jobs, dict):
            jobs[self.job.name] = self.job
        self.status.value = (f"job {self.job.name} running (`%fed jobs` lists it, "
                             f"`%fed cancel {self.job.name}` stops it)")
        self.cancel_button.disabled = False
        try:
            self.job.wait()
        finally:
            self.cancel_button.disabled = True
        self.result = self.job.history
        if self.job.status != "done":
            raise RuntimeError(f"job {self.job.name} {self.job.status}: {self.job.error}")
        self.status.value = f"job {self.job.name} done: {experiment.round_current}/{experiment.rounds} rounds"

    def cancel(self) -> None:
        """Stop the training in flight (the nodes are told to stop their round)."""
        job = getattr(self, "job", None)
        if job is not None and job.running:
            job.cancel(wait=0)
        self._cancel.set()
