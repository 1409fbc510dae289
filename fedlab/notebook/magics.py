"""``%fed`` and ``%%fed``: parse a line, call the researcher API, show the result.

Thin on purpose (STYLE.md point 7): every sub-command is a few lines over ``fedlab.Researcher``,
``fedlab.Experiment`` and the widgets, all of which work without IPython. What the magics
add is the user's side of errors: a ``FedlabError`` or a bad argument becomes exactly
``UsageError`` with one line that says what to do (a subclass, or any other exception, makes
IPython print a traceback a notebook user cannot act on).
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from typing import Any

import pandas as pd
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display

from fedlab.errors import FedlabError, FedlabTimeoutError, FedlabTransportError
from fedlab.notebook.background import BackgroundTraining, run_rounds
from fedlab.notebook.parsing import (
    SUBCOMMANDS,
    FedArgumentError,
    HelpShown,
    build_parser,
    command_parser,
    overview,
    parse,
)
from fedlab.notebook.session import Session

log = logging.getLogger("fedlab.notebook")

__all__ = ["FedMagics", "current_session", "load_ipython_extension", "unload_ipython_extension"]


def one_line(text: object) -> str:
    return " ".join(str(text).split())


@magics_class
class FedMagics(Magics):
    """The ``%fed`` magics of one shell; ``session`` holds what lines share."""

    def __init__(self, shell: Any = None, session: Session | None = None) -> None:
        super().__init__(shell)
        self.session = session or Session()
        self.parser = build_parser()

    @line_cell_magic
    def fed(self, line: str, cell: str | None = None) -> Any:
        """Federated analytics and training: `%fed help` lists the sub-commands."""
        tokens: list[str] = []
        try:
            try:
                tokens = shlex.split(line, comments=True)  # `%fed nodes  # a comment`, as in Python
            except ValueError as exc:
                raise FedArgumentError(f"%fed: cannot split the line ({exc}); check the quotes") from None
            args = parse(tokens, self.parser)
            if cell is not None and args.command != "plan":
                raise FedArgumentError(f"%%fed {args.command} takes no cell body; only `%%fed plan NAME` does")
            return getattr(self, "_" + args.command)(args, cell)
        except HelpShown:
            return None
        except FedArgumentError as exc:
            topic = tokens[0] if tokens and tokens[0] in SUBCOMMANDS and tokens[0] != "help" else ""
            hint = f"; `%fed help {topic}` shows the options" if topic else ""
            raise UsageError(one_line(exc) + hint) from None
        except FedlabError as exc:
            raise UsageError(one_line(exc)) from None

    # -- helpers -------------------------------------------------------------------------------------
    @property
    def user_ns(self) -> dict[str, Any]:
        if self.shell is None:
            raise FedlabError("%fed needs an IPython shell; load it with `%load_ext fedlab`")
        return self.shell.user_ns

    def _store(self, name: str | None, value: Any) -> Any:
        if name:
            self.user_ns[name] = value
        return value

    # -- connection and data -------------------------------------------------------------------------
    def _connect(self, args: Any, cell: str | None) -> pd.DataFrame:
        try:
            researcher = self.session.connect(args.address, wait=args.wait, timeout=args.timeout,
                                              key=args.key, allowlist=args.allowlist)
        except FedlabTransportError as exc:
            if isinstance(exc, FedlabTimeoutError):
                raise
            raise FedlabTransportError(f"{one_line(exc)} In a notebook: `%fed connect tcp://127.0.0.1:PORT` "
                                       "with a free PORT, and the same address for the nodes.") from exc
        nodes = researcher.nodes()
        if researcher.service is not None:
            print(f"attached to the researcher service for {researcher.service.address} (pid "
                  f"{researcher.service.pid}): the nodes stay connected when this kernel restarts")
        if nodes.empty:
            who = "the researcher service listens" if researcher.service is not None else "listening"
            print(f"{who} on {researcher.address}; no node has dialled in yet (start one with "
                  f"`fedlab node start DIR --researcher {researcher.address}`)")
        return nodes

    def _nodes(self, args: Any, cell: str | None) -> pd.DataFrame:
        return self.session.researcher.nodes()

    def _datasets(self, args: Any, cell: str | None) -> pd.DataFrame:
        researcher = self.session.researcher
        frame = researcher.search(args.tags).to_frame() if args.tags else researcher.list_datasets()
        return self._store(args.out, frame)

    def _stats(self, args: Any, cell: str | None) -> pd.DataFrame:
        researcher = self.session.researcher
        fds = researcher.search(args.tags)
        dp: dict[str, Any] = {}
        if args.epsilon is not None:  # parse() checked that the DP options fit together
            dp = {"epsilon": args.epsilon, "delta": args.delta or 0.0, "mechanism": args.mechanism or "laplace",
                  "bounds": args.bounds, "categories": args.categories, "quantile_bins": args.quantile_bins or 32}
        result = researcher.stats(fds, args.stats, args.columns, quantiles=args.quantiles, secagg=args.secagg, **dp)
        _print_notes(result.notes())
        if result.dp:
            self._show_budget(result, fds)
        return self._store(args.out, result.global_stats())

    def _budget(self, args: Any, cell: str | None) -> pd.DataFrame:
        researcher = self.session.researcher
        fds = researcher.search(args.tags)
        frame = researcher.privacy_budget(fds)
        self._show_budget(frame, fds)
        return self._store(args.out, frame)

    def _show_budget(self, source: Any, fds: Any, *, show: bool = True) -> None:
        """Update the session's budget panel from ``source`` and show it under this cell (the same widget: a
        panel shown by an earlier cell changes with it). Without ipywidgets the tables are all there is."""
        try:
            from fedlab.notebook.budget import BudgetPanel
        except ImportError:
            return
        if self.session.budget is None:
            self.session.budget = BudgetPanel()
        frame = fds.to_frame()
        self.session.budget.update(source, dataset=dict(zip(frame["node"], frame["name"], strict=True)))
        if show:
            display(self.session.budget)

    def _budget_after_rounds(self, exp: Any, panel: Any) -> Any:
        """For a DP experiment: a progress panel that, after each round, also refreshes the budget panel from
        the nodes' ledgers (a small request per round; a node that does not answer keeps its last figures)."""
        if not (exp.training_args or {}).get("dp_args"):
            return panel
        researcher = self.session.researcher

        def refresh() -> None:
            try:
                self._show_budget(researcher.privacy_budget(exp.fds), exp.fds, show=False)
            except FedlabError as exc:  # the round's outcome stands; the panel just stays as it was
                log.warning("could not refresh the privacy budget panel: %s", one_line(exc))

        self._show_budget(researcher.privacy_budget(exp.fds), exp.fds)
        return _RefreshAfterRound(panel, refresh)

    def _hist(self, args: Any, cell: str | None) -> pd.DataFrame:
        researcher = self.session.researcher
        bins: Any = args.edges if args.edges else args.bins
        result = researcher.stats(researcher.search(args.tags), ["histogram"], [args.column], bins=bins)
        _print_notes(result.notes())
        try:
            frame = result.histogram(args.column)
        except KeyError:
            raise FedlabError(f"no node released a histogram of {args.column!r} "
                              f"({'; '.join(result.notes()) or 'not a numeric column?'})") from None
        if not args.no_plot:
            try:
                from fedlab.notebook.display import bundle
                from fedlab.notebook.plots import histogram_figure
            except ImportError:  # matplotlib missing: the table alone
                pass
            else:
                display(bundle(histogram_figure(result, args.column)), raw=True)
        return self._store(args.out, frame)

    def _preprocess(self, args: Any, cell: str | None) -> pd.DataFrame:
        if not args.steps:
            raise FedArgumentError("%fed preprocess: give at least one step, e.g. --standardize age bmi")
        researcher = self.session.researcher
        pipeline = researcher.preprocess(researcher.search(args.tags))
        for step, columns in args.steps:
            if step == "impute":
                pipeline.impute(columns, strategy=args.strategy)
            else:
                getattr(pipeline, step)(columns)
        derived = pipeline.apply(name=args.name, tags=args.new_tags, description=args.description)
        for node, why in pipeline.dropped.items():
            print(f"{node} was dropped: {why}", file=sys.stderr)
        return self._store(args.out, derived.to_frame())

    # -- plans and approval --------------------------------------------------------------------------
    def _plan(self, args: Any, cell: str | None) -> None:
        if cell is None:
            raise FedArgumentError(f"%fed plan: write the plan in a cell that starts with `%%fed plan {args.name}`")
        cls = self.session.add_plan(args.name, cell, args.class_name)
        self.user_ns[cls.__name__] = cls
        print(f"plan {args.name!r}: class {cls.__name__} (also defined here); "
              f"next: `%fed approve {args.name} --tags ...`")

    def _plans(self, args: Any, cell: str | None) -> pd.DataFrame:
        return self.session.plans_frame()

    def _approve(self, args: Any, cell: str | None) -> Any:
        exp = self.session.approval(args.name, args.tags)
        exp.approve(args.description)
        try:
            from fedlab.notebook.approval import ApprovalPanel
        except ImportError:  # no ipywidgets: a table, and --wait polls it
            return self._store(args.out, _wait_table(exp, args.wait, args.poll))
        panel = ApprovalPanel(exp.check, poll_interval=args.poll)
        self.session.set_panel(args.name, panel)
        display(panel)
        self._store(args.out, panel)
        if args.wait and not panel.wait(args.wait):
            raise FedlabError(_not_approved(args.name, panel.frame, args.wait))
        return None

    def _status(self, args: Any, cell: str | None) -> pd.DataFrame:
        return self._store(args.out, self.session.approval(args.name, args.tags).check())

    # -- training ------------------------------------------------------------------------------------
    def _train(self, args: Any, cell: str | None) -> Any:
        exp = self.session.experiment(
            args.name, args.tags, rounds=args.rounds, aggregator=args.aggregator,
            aggregator_args=args.aggregator_args, model_args=args.model_args, training_args=args.training_args,
            round_timeout=args.round_timeout, secagg=args.secagg)
        self.session.experiments[args.name] = exp
        title = f"training {args.name}"
        if args.secagg:
            title += " (secure aggregation: the researcher sees only sums)"
        panel = _progress_panel(self.session.node_names(), exp, title=title)
        if panel is not None:
            exp.on_progress = panel.on_event
            self.session.progress[args.name] = panel
            display(panel)
        panel = self._budget_after_rounds(exp, panel)
        if args.background:
            name = self.session.new_job_name(args.name)
            job = BackgroundTraining(exp, panel, name=name, plan=args.name)
            self.session.jobs[name] = job
            print(f"job {name} started; `%fed jobs` shows it, `%fed cancel {name}` stops it")
            self._store(args.out, job)
            return None
        try:
            history = run_rounds(exp, panel)
        except FedlabError as exc:
            if "not_approved" not in str(exc):
                raise
            raise FedlabError(f"{one_line(exc)} -- ask the operators with `%fed approve {args.name} "
                              f"--tags {' '.join(args.tags)}`") from exc
        return self._store(args.out, history)

    def _jobs(self, args: Any, cell: str | None) -> pd.DataFrame:
        return self._store(args.out, self.session.jobs_frame())

    def _cancel(self, args: Any, cell: str | None) -> None:
        job = self.session.job(args.job)
        if not job.running:
            print(f"job {job.name} is already {job.status}")
            return
        ended = job.cancel(wait=30.0)
        print(f"job {job.name} {job.status}" + ("" if ended else "; the nodes are still stopping"))

    # -- forms and help ------------------------------------------------------------------------------
    def _form(self, args: Any, cell: str | None) -> None:
        try:
            from fedlab.notebook import forms
        except ImportError:
            print(f"forms are not available here (ipywidgets missing); use `%fed help {args.kind}`")
            return
        display(getattr(forms, f"{args.kind}_form")(self.session))

    def _help(self, args: Any, cell: str | None) -> None:
        if args.topic is None:
            print(overview())
            return
        if args.topic not in SUBCOMMANDS:
            raise FedArgumentError(f"%fed help: no sub-command {args.topic!r}; `%fed help` lists them")
        print(command_parser(self.parser, args.topic).format_help())


def _print_notes(notes: list[str]) -> None:
    for line in notes:
        print(line, file=sys.stderr)


def _progress_panel(names: dict[str, str], exp: Any, title: str) -> Any:
    try:
        from fedlab.notebook.progress import TrainingProgress
    except ImportError:  # no ipywidgets: the history at the end is all there is
        return None
    return TrainingProgress({n: names.get(n, n) for n in exp.node_ids}, exp.rounds, title=title)


def _not_approved(name: str, frame: pd.DataFrame | None, waited: float) -> str:
    if frame is None or frame.empty:
        return f"plan {name!r} is not approved after {waited:g} s; the nodes could not be asked"
    waiting = frame[frame["status"] != "Approved"]
    lines = "; ".join(f"{r.node}: {r.status} ({one_line(r.message)})" for r in waiting.itertuples())
    return f"plan {name!r} is not approved on {len(waiting)} node(s) after {waited:g} s: {lines}"


def _wait_table(exp: Any, wait: float | None, poll: float) -> pd.DataFrame:
    frame = exp.check()
    deadline = time.monotonic() + (wait or 0)
    while wait and (frame["status"] != "Approved").any():
        if time.monotonic() >= deadline:
            raise FedlabError(_not_approved(exp.plan_class, frame, wait))
        time.sleep(poll)
        frame = exp.check()
    return frame


def current_session(shell: Any = None) -> Session:
    """The session of ``shell`` (default: the running IPython) after ``%load_ext fedlab``."""
    if shell is None:
        from IPython import get_ipython

        shell = get_ipython()
    magics = shell.magics_manager.registry.get("FedMagics") if shell is not None else None
    if magics is None:
        raise FedlabError("the fedlab extension is not loaded; run `%load_ext fedlab` first")
    return magics.session


def load_ipython_extension(shell: Any) -> None:
    """Register ``%fed``/``%%fed``; loading again keeps the session (its socket is still bound)."""
    existing = shell.magics_manager.registry.get("FedMagics")
    shell.register_magics(FedMagics(shell, existing.session if existing is not None else None))


def unload_ipython_extension(shell: Any) -> None:
    existing = shell.magics_manager.registry.get("FedMagics")
    if existing is not None:
        existing.session.close()


class _RefreshAfterRound:
    """A progress panel (or None) that also calls ``refresh`` after each round it is told about."""

    def __init__(self, panel: Any, refresh: Any) -> None:
        self._panel, self._refresh = panel, refresh

    def __getattr__(self, name: str) -> Any:
        return getattr(self._panel, name)

    def round_done(self, rows: Any) -> None:
        if self._panel is not None:
            self._panel.round_done(rows)
        self._refresh()
