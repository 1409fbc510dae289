"""Forms: the %fed jobs as widgets, for researchers who would rather click than type.

Each form reads what it offers from the live federation (tags and columns from
``researcher.list_datasets()``, plans from ``session.plans``), shows the ``%fed`` line that
does the same thing (so the next run can be a line in a cell, and a reader of the notebook
sees what was done), and on Submit calls the same researcher API the magic calls, on a daemon
thread: the kernel stays free, and results are appended to the form's Output by setting its
trait (thread-safe). ``submit()`` does the same work synchronously and returns the result,
which is what tests and scripts call.

The session is duck-typed: anything with ``.researcher`` (a ``fedlab.Researcher``) and
``.plans`` (name -> (module source, class name)) will do.
"""

from __future__ import annotations

import shlex
import threading
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as w
import pandas as pd

from fedlab.notebook.display import append

__all__ = ["Form", "StatsForm", "columns_for", "default_tag", "fed_line", "parse_bins", "preprocess_form",
           "stats_form", "tag_options", "train_form"]

FORM_STATS = ("count", "missing", "sum", "mean", "var", "std", "min", "max", "median", "quantiles")
DEFAULT_STATS = ("count", "mean", "std")


def fed_line(*words: Any) -> str:
    """``%fed`` followed by the words, each quoted for the shell-like split the magic does."""
    return " ".join(["%fed", *(shlex.quote(str(word)) for word in words)])


def tag_options(datasets: pd.DataFrame) -> list[str]:
    """Every tag of every dataset, the ones held by most nodes first."""
    if datasets.empty or "tags" not in datasets:
        return []
    counts: dict[str, int] = {}
    for tags in datasets["tags"]:
        for tag in tags:
            counts[tag] = counts.get(tag, 0) + 1
    return sorted(counts, key=lambda t: (-counts[t], t))


def default_tag(datasets: pd.DataFrame) -> str | None:
    """The tag a form starts on: the most widely held one that names one dataset per node.

    A tag such as ``csv`` that several datasets of one node carry would make the form's first
    search fail ("holds 2 datasets tagged ..."), so such tags are passed over.
    """
    for tag in tag_options(datasets):
        holders = [node for node, tags in zip(datasets["node_id"], datasets["tags"], strict=True) if tag in tags]
        if len(holders) == len(set(holders)):
            return tag
    return None


def columns_for(datasets: pd.DataFrame, tags: Sequence[str]) -> list[str]:
    """Columns of the datasets carrying all ``tags`` (union, in first-seen order)."""
    if datasets.empty or not tags or "columns" not in datasets:
        return []
    seen: dict[str, None] = {}
    for dataset_tags, columns in zip(datasets["tags"], datasets["columns"], strict=True):
        if set(tags) <= set(dataset_tags):
            seen.update(dict.fromkeys(columns))
    return list(seen)


def parse_bins(text: str) -> int | list[float]:
    """``"10"`` -> 10 bins over the federated range; ``"0, 40, 60"`` -> those edges (nodes that do
    not release min/max, the default, need edges)."""
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        if len(parts) == 1:
            return int(parts[0])
        if len(parts) >= 2:
            return [float(p) for p in parts]
    except ValueError:
        pass
    raise ValueError(f"bins must be a count (10) or increasing edges (0, 40, 60, 100), not {text!r}")


class Form(w.VBox):
    """The parts every form shares: tags, the %fed line, Submit, a status line and an Output."""

    submit_label = "Run"

    def __init__(self, session: Any, title: str) -> None:
        self.session = session
        self.title = w.Label(title)
        self.datasets = pd.DataFrame()
        self.tags = w.SelectMultiple(description="tags", rows=4)
        self.refresh_button = w.Button(description="Refresh", tooltip="ask the nodes for their datasets again")
        self.command = w.Label("", layout=w.Layout(width="auto"))
        self.submit_button = w.Button(description=self.submit_label, button_style="primary")
        self.status = w.Label("")
        self.output = w.Output()
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.refresh_button.on_click(lambda _: self.refresh())
        self.submit_button.on_click(lambda _: self.start())
        super().__init__()

    def _layout(self, *fields: w.Widget) -> None:
        self.children = [self.title, w.HBox([self.tags, self.refresh_button]), *fields,
                         w.HBox([self.submit_button, self.status]), self.command, self.output]

    def _watch(self, *widgets: w.Widget) -> None:
        for widget in widgets:
            widget.observe(lambda _: self.update_command(), names="value")

    # -- data from the federation ------------------------------------------------------------
    def refresh(self) -> None:
        """Reload the datasets (tags and columns) from the nodes online now."""
        try:
            self.datasets = self.session.researcher.list_datasets()
        except Exception as exc:  # shown in the form: the user may start the nodes and press Refresh
            self.status.value = f"could not list datasets: {exc}"
            return
        options = tag_options(self.datasets)
        keep = tuple(t for t in self.tags.value if t in options)
        self.tags.options = options
        first = default_tag(self.datasets)
        self.tags.value = keep or ((first,) if first is not None else ())
        self.status.value = f"{self.datasets['node_id'].nunique() if len(self.datasets) else 0} nodes, " \
                            f"{len(self.datasets)} datasets"

    def update_command(self) -> None:
        self.command.value = "equivalent: " + " ; ".join(self.commands())

    def commands(self) -> list[str]:
        raise NotImplementedError

    # -- running -------------------------------------------------------------------------------
    def submit(self) -> Any:
        raise NotImplementedError

    def start(self) -> threading.Thread:
        """Submit on a daemon thread (what the button does); errors show in the form."""
        self.thread = threading.Thread(target=self._guarded, args=(self.submit,), daemon=True,
                                       name=f"fedlab-{type(self).__name__}")
        self.thread.start()
        return self.thread

    def wait(self, timeout: float | None = None) -> Any:
        if self.thread is not None:
            self.thread.join(timeout)
        return self.result

    def _guarded(self, job: Callable[[], Any]) -> None:
        self.submit_button.disabled = True
        self.error = None
        try:
            job()
        except Exception as exc:  # a form never raises into the void of a thread: it says what went wrong
            self.error = exc
            self.status.value = f"error: {exc}"
            append(self.output, f"{type(exc).__name__}: {exc}", stream="stderr")
        finally:
            self.submit_button.disabled = False

    def _selected_tags(self) -> list[str]:
        tags = list(self.tags.value)
        if not tags:
            raise ValueError("pick at least one tag")
        return tags


class StatsForm(Form):
    """Federated statistics (and a histogram) over the datasets carrying the chosen tags."""

    def __init__(self, session: Any) -> None:
        super().__init__(session, "federated statistics")
        self.columns = w.SelectMultiple(description="columns", rows=6)
        self.stat_boxes = {s: w.Checkbox(value=s in DEFAULT_STATS, description=s, indent=False,
                                         layout=w.Layout(width="95px")) for s in FORM_STATS}
        self.hist_column = w.Dropdown(description="histogram", options=[("(none)", "")], value="")
        self.bins = w.Text(value="10", description="bins", placeholder="10, or edges: 0, 40, 60, 100",
                           tooltip="a bin count (needs nodes that release min/max) or the bin edges")
        self.tags.observe(lambda _: self._columns_changed(), names="value")
        self._watch(self.columns, *self.stat_boxes.values(), self.hist_column, self.bins)
        self._layout(self.columns, w.HBox(list(self.stat_boxes.values()), layout=w.Layout(flex_flow="row wrap")),
                     w.HBox([self.hist_column, self.bins]))
        self.refresh()
        self.update_command()

    def _columns_changed(self) -> None:
        options = columns_for(self.datasets, self.tags.value)
        keep = tuple(c for c in self.columns.value if c in options)
        self.columns.options = options
        self.columns.value = keep
        self.hist_column.options = [("(none)", ""), *((c, c) for c in options)]
        self.update_command()

    def stats(self) -> list[str]:
        return [s for s, box in self.stat_boxes.items() if box.value]

    def commands(self) -> list[str]:
        tags = list(self.tags.value) or ["TAG"]
        lines = []
        if self.stats():
            columns = ["--columns", *self.columns.value] if self.columns.value else []
            lines.append(fed_line("stats", *self.stats(), "--tags", *tags, *columns))
        if self.hist_column.value:
            try:
                bins = parse_bins(self.bins.value)
            except ValueError:
                bins = 10
            spec = ["--edges", *(f"{e:g}" for e in bins)] if isinstance(bins, list) else ["--bins", bins]
            lines.append(fed_line("hist", self.hist_column.value, "--tags", *tags, *spec))
        return lines

    def submit(self) -> Any:
        from fedlab.notebook.plots import histogram_figure

        tags = self._selected_tags()
        if not self.stats() and not self.hist_column.value:
            raise ValueError("tick at least one statistic, or pick a column for a histogram")
        researcher = self.session.researcher
        self.status.value = "searching..."
        fds = researcher.search(tags)
        shown: list[Any] = []
        if self.stats():
            self.status.value = f"computing on {len(fds)} nodes..."
            self.result = researcher.stats(fds, self.stats(), list(self.columns.value) or None)
            shown.append(self.result)
        if self.hist_column.value:
            hist = researcher.stats(fds, ["histogram"], [self.hist_column.value], bins=parse_bins(self.bins.value))
            self.histogram = hist.histogram(self.hist_column.value)
            shown += [self.histogram, histogram_figure(hist, self.hist_column.value)]
            self.result = self.result if self.stats() else hist
        append(self.output, *shown)
        self.status.value = f"done: {len(fds)} nodes"
        return self.result


def stats_form(session: Any) -> StatsForm:
    """A form for ``%fed stats`` / ``%fed hist``."""
    return StatsForm(session)


def train_form(session: Any) -> Any:
    """A form for ``%fed approve`` / ``%fed train``: plan, tags, rounds, aggregator, arguments."""
    from fedlab.notebook.training_form import TrainForm

    return TrainForm(session)


def preprocess_form(session: Any) -> Any:
    """A form for a federated preprocessing pipeline (``%fed preprocess``)."""
    from fedlab.notebook.preprocess_form import PreprocessForm

    return PreprocessForm(session)
