"""Session: what one IPython kernel remembers between ``%fed`` lines.

The magics are stateless parsers; everything a later line needs lives here: the researcher
(attached to the researcher service of its address when one runs, so that several notebooks
share the nodes; else one bound socket per kernel; made once, on first use, and replaced only
by ``%fed connect``), the plans written with ``%%fed plan`` (their source text, which is what
the nodes approve, so approve, status and train all send byte-identical plans) and the
background trainings. It imports neither IPython nor ipywidgets, so the forms and the tests
can drive it directly.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from fedlab.errors import FedlabError

if TYPE_CHECKING:
    from fedlab.notebook.background import BackgroundTraining
    from fedlab.researcher import Experiment, Researcher

__all__ = ["ADDRESS_ENV", "DEFAULT_ADDRESS", "PlanApproval", "Session"]

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
ADDRESS_ENV = "FEDLAB_ADDRESS"  # lets a notebook run unchanged against nodes started elsewhere
SETTLE_SECONDS = 0.5  # after the first node dials in, the others started with it arrive within this


class Session:
    """One per IPython shell: the researcher, the plans by name, the background jobs by name."""

    def __init__(self, address: str | None = None, *, heartbeat_interval: float = 1.0) -> None:
        self.address = address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS
        self.heartbeat_interval = heartbeat_interval
        self.key: str | None = None  # None: the researcher reads $FEDLAB_KEY / $FEDLAB_ALLOWLIST
        self.allowlist: str | None = None
        self._researcher: Researcher | None = None
        self.plans: dict[str, tuple[str, str]] = {}
        self.jobs: dict[str, BackgroundTraining] = {}
        self.experiments: dict[str, Experiment] = {}  # the last one trained per plan name
        self.panels: dict[str, Any] = {}  # approval panels per plan name, closed when replaced
        self.progress: dict[str, Any] = {}  # the last training progress panel per plan name
        self.budget: Any = None  # the privacy budget panel, made by the first DP answer or `%fed budget`
        self._job_numbers = itertools.count(1)

    # -- the researcher ----------------------------------------------------------------------------
    @property
    def researcher(self) -> Researcher:
        """The connected researcher; connects to ``self.address`` on first use."""
        if self._researcher is None:
            self.connect()
        assert self._researcher is not None
        return self._researcher

    @property
    def connected(self) -> bool:
        return self._researcher is not None

    def connect(self, address: str | None = None, *, wait: int | None = None, timeout: float = 30.0,
                first_node_timeout: float = 5.0, key: str | None = None, allowlist: str | None = None
                ) -> Researcher:
        """Attach to the researcher service of ``address`` (default: the session's), or bind it when none
        runs (``$FEDLAB_SERVICE`` forces one or the other), and wait for the nodes.

        ``key`` and ``allowlist`` (kept for later reconnections) make the connection encrypted and
        limited to the listed nodes; see ``Researcher``.

        With ``wait`` the call waits for that many nodes (and raises when they do not come);
        without, it waits up to ``first_node_timeout`` for a first node and a moment more for
        the others, so that the next line already sees them.
        """
        from fedlab.researcher import Researcher

        running = [name for name, job in self.jobs.items() if job.status == "running"]
        if running and self._researcher is not None:
            raise FedlabError(f"background training {', '.join(running)} still uses this connection; "
                              f"wait for it or `%fed cancel {running[0]}` first")
        for panel in self.panels.values():  # they poll through the researcher about to close
            _close_panel(panel)
        self.panels.clear()
        self.close_researcher()
        self.address = address or self.address
        self.key, self.allowlist = key or self.key, allowlist or self.allowlist
        self._researcher = Researcher(self.address, heartbeat_interval=self.heartbeat_interval,
                                      key=self.key, allowlist=self.allowlist)
        if wait:
            self._researcher.wait_for_nodes(wait, timeout=timeout)
        else:
            deadline = time.monotonic() + first_node_timeout
            while not self._researcher.online_node_ids() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._researcher.online_node_ids():
                time.sleep(SETTLE_SECONDS)
        return self._researcher

    def close_researcher(self) -> None:
        if self._researcher is not None:
            self._researcher.close()
            self._researcher = None

    def close(self) -> None:
        """Cancel the background jobs, stop the panels, unbind the socket."""
        for job in self.jobs.values():
            if job.status == "running":
                job.cancel(wait=10.0)
        for panel in self.panels.values():
            _close_panel(panel)
        self.panels.clear()
        self.close_researcher()

    def node_names(self) -> dict[str, str]:
        frame = self.researcher.nodes()
        return dict(zip(frame["node_id"].astype(str), frame["name"].astype(str), strict=True))

    # -- plans ---------------------------------------------------------------------------------------
    def add_plan(self, name: str, source: str, class_name: str | None = None) -> type:
        """Keep the cell's plan under ``name``; return its class (loaded as the nodes will load it)."""
        from fedlab.training.source import load_plan_class, plan_source

        if not source.strip():
            raise FedlabError(f"the cell below `%%fed plan {name}` is empty; write a TorchTrainingPlan subclass there")
        module, cls_name = plan_source(source, class_name)
        cls = load_plan_class(module, cls_name)
        self.plans[name] = (module, cls_name)
        return cls

    def plan(self, name: str) -> tuple[str, str]:
        try:
            return self.plans[name]
        except KeyError:
            known = f" (defined: {', '.join(self.plans)})" if self.plans else ""
            raise FedlabError(f"no training plan named {name!r}{known}; write one in a cell starting with "
                              f"`%%fed plan {name}`") from None

    def plans_frame(self) -> pd.DataFrame:
        from fedlab.training.source import plan_id

        rows = [{"plan": name, "class": cls, "plan_id": plan_id(src)[:12], "lines": src.count("\n")}
                for name, (src, cls) in self.plans.items()]
        return pd.DataFrame(rows, columns=["plan", "class", "plan_id", "lines"])

    def experiment(self, name: str, tags: str | Sequence[str], **kwargs: Any) -> Experiment:
        """An Experiment of plan ``name`` over the nodes holding ``tags`` (a search happens now)."""
        from fedlab.researcher import Experiment

        source, cls = self.plan(name)
        return Experiment(self.researcher, tags, source, plan_class=cls, **kwargs)

    def approval(self, name: str, tags: str | Sequence[str]) -> PlanApproval:
        """Approve and check plan ``name`` on the nodes holding ``tags`` (no model is built)."""
        source, cls = self.plan(name)
        return PlanApproval(self.researcher, tags, source, cls)

    def set_panel(self, name: str, panel: Any) -> None:
        """Remember the approval panel of ``name``; the one it replaces stops polling."""
        old = self.panels.pop(name, None)
        if old is not None and old is not panel:
            _close_panel(old)
        self.panels[name] = panel

    # -- background jobs -----------------------------------------------------------------------------
    def new_job_name(self, plan: str) -> str:
        while True:
            name = f"{plan}-{next(self._job_numbers)}"
            if name not in self.jobs:
                return name

    def job(self, name: str) -> BackgroundTraining:
        try:
            return self.jobs[name]
        except KeyError:
            known = ", ".join(self.jobs) or "none yet"
            raise FedlabError(f"no background job named {name!r} (jobs: {known}); `%fed jobs` lists them") from None

    def jobs_frame(self) -> pd.DataFrame:
        from fedlab.notebook.background import JOB_COLUMNS

        return pd.DataFrame([job.summary() for job in self.jobs.values()], columns=JOB_COLUMNS)

    def __repr__(self) -> str:
        state = "connected" if self.connected else "not connected"
        return f"Session({self.address}, {state}, {len(self.plans)} plans, {len(self.jobs)} jobs)"


class _QuietThreads(logging.Filter):
    """Drops the researcher's per-node warnings logged by the threads inside ``quiet()``.

    A plan check logs a warning for every node that has not approved yet; an approval panel
    polling every second would print them again and again under the panel that shows the
    same thing. Other threads (a training round) still log as usual.
    """

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread not in self.threads or record.levelno > logging.WARNING


_QUIET = _QuietThreads()
logging.getLogger("fedlab.researcher").addFilter(_QUIET)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    ident = threading.get_ident()
    _QUIET.threads.add(ident)
    try:
        yield
    finally:
        _QUIET.threads.discard(ident)


class PlanApproval:
    """A plan's approval on the nodes holding a tagged dataset: ``approve`` and ``check`` as in
    ``Experiment``, without building the model (which would need the model arguments), so that
    ``%fed approve NAME`` and ``%fed status NAME`` need nothing but the plan and the tags."""

    def __init__(self, researcher: Researcher, tags: str | Sequence[str], source: str, plan_class: str) -> None:
        self.researcher = researcher
        self.source, self.plan_class = source, plan_class
        self.node_ids = researcher.search(tags).node_ids()

    def _names(self) -> dict[str, str]:
        frame = self.researcher.nodes()
        return dict(zip(frame["node_id"].astype(str), frame["name"].astype(str), strict=True))

    def _kwargs(self) -> dict[str, Any]:
        return {"researcher_id": self.researcher.id, "requests": self.researcher.requests, "nodes": self.node_ids}

    def approve(self, description: str = "") -> pd.DataFrame:
        """Queue the plan for each operator's decision; one row per node with its status."""
        from fedlab.researcher import TrainingPlanApproveJob
        from fedlab.researcher.training_tables import status_frame

        job = TrainingPlanApproveJob(self.source, self.plan_class, description, **self._kwargs())
        return status_frame(job.execute(), job, self.node_ids, self._names())

    def check(self) -> pd.DataFrame:
        """Whether each node may run the plan: status, plan id and the operator's command."""
        from fedlab.researcher import TrainingPlanCheckJob
        from fedlab.researcher.training_tables import status_frame

        job = TrainingPlanCheckJob(None, self.source, self.plan_class, **self._kwargs())
        with quiet():  # the table says which node waits for whom; no warning per node per poll
            replies = job.execute()
        return status_frame(replies, job, self.node_ids, self._names())


def _close_panel(panel: Any) -> None:
    stop = getattr(panel, "retire", None) or getattr(panel, "stop", None) or getattr(panel, "close", None)
    if callable(stop):
        stop()
