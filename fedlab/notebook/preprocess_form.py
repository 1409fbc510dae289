"""The preprocessing form: build a federated pipeline step by step, then write it on every node.

Each step is fitted federatedly when the pipeline runs (``researcher.preprocess(fds)``), in the
order the steps were added, as ``%fed preprocess --impute C ... --standardize C ...`` keeps the
order its options were written in (and, like the magic, one ``--strategy`` serves every impute
step). ``apply`` writes the derived dataset on every node under a new name and tags, and the
form shows the new datasets and any node the pipeline dropped.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as w

from fedlab.notebook.display import append
from fedlab.notebook.forms import Form, columns_for, fed_line

__all__ = ["STEPS", "PreprocessForm", "step_word"]

STEPS = ("standardize", "minmax", "impute", "onehot", "combat")
STRATEGIES = ("mean", "median", "most_frequent")


def step_word(step: dict[str, Any]) -> str:
    """One step as the form lists it: ``standardize(age, bmi)``."""
    return f"{step['type']}({', '.join(step['columns'])})"


class PreprocessForm(Form):
    """Steps (type, columns), then Apply: a derived dataset on every node, with its lineage."""

    submit_label = "Apply"

    def __init__(self, session: Any) -> None:
        super().__init__(session, "federated preprocessing")
        self.step = w.Dropdown(description="step", options=STEPS, value="standardize")
        self.strategy = w.Dropdown(description="impute with", options=STRATEGIES, value="mean")
        self.columns = w.SelectMultiple(description="columns", rows=6)
        self.add_button = w.Button(description="Add step")
        self.clear_button = w.Button(description="Clear steps")
        self.steps_label = w.Label("no steps yet")
        self.name = w.Text(description="new name", placeholder="cancer-clean")
        self.new_tags = w.Text(description="new tags", placeholder="cancer-clean, csv")
        self.steps: list[dict[str, Any]] = []
        self.tags.observe(lambda _: self._columns_changed(), names="value")
        self.add_button.on_click(lambda _: self._add_clicked())
        self.clear_button.on_click(lambda _: self.clear_steps())
        self._watch(self.tags, self.name, self.new_tags, self.strategy)
        self._layout(w.HBox([self.step, self.strategy]), self.columns,
                     w.HBox([self.add_button, self.clear_button, self.steps_label]),
                     w.HBox([self.name, self.new_tags]))
        self.refresh()
        self.update_command()

    def _columns_changed(self) -> None:
        self.columns.options = columns_for(self.datasets, self.tags.value)

    def _add_clicked(self) -> None:
        try:
            self.add_step(self.step.value, list(self.columns.value))
        except ValueError as exc:
            self.status.value = str(exc)

    def add_step(self, step: str, columns: list[str]) -> None:
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}; choose from {', '.join(STEPS)}")
        if not columns:
            raise ValueError("pick the columns the step applies to")
        self.steps.append({"type": step, "columns": list(columns)})
        self.steps_label.value = " → ".join(step_word(s) for s in self.steps)
        self.update_command()

    def clear_steps(self) -> None:
        self.steps = []
        self.steps_label.value = "no steps yet"
        self.update_command()

    def _new_tags(self) -> list[str]:
        return [t.strip() for t in self.new_tags.value.split(",") if t.strip()]

    def commands(self) -> list[str]:
        tags = list(self.tags.value) or ["TAG"]
        steps = [word for s in self.steps for word in (f"--{s['type']}", *s["columns"])] or ["--standardize", "C"]
        strategy = ["--strategy", self.strategy.value] if any(s["type"] == "impute" for s in self.steps) else []
        return [fed_line("preprocess", "--tags", *tags, "--name", self.name.value or "NAME",
                         "--new-tags", *(self._new_tags() or ["NEW_TAG"]), *steps, *strategy)]

    def submit(self) -> Any:
        tags = self._selected_tags()
        if not self.steps:
            raise ValueError("add at least one step (pick a step and columns, then Add step)")
        if not self.name.value.strip() or not self._new_tags():
            raise ValueError("give the derived dataset a name and at least one tag")
        researcher = self.session.researcher
        self.status.value = "searching..."
        pipeline = researcher.preprocess(researcher.search(tags))
        for spec in self.steps:
            self.status.value = f"fitting {step_word(spec)}..."
            method = getattr(pipeline, spec["type"])
            if spec["type"] == "impute":
                method(spec["columns"], strategy=self.strategy.value)
            else:
                method(spec["columns"])
        self.status.value = "writing the derived datasets..."
        derived = pipeline.apply(name=self.name.value.strip(), tags=self._new_tags())
        self.pipeline, self.result = pipeline, derived
        append(self.output, derived.to_frame(), repr(pipeline))
        self.refresh()  # the new dataset's tags join the choices
        self.status.value = f"done: {len(derived)} nodes hold {self.name.value.strip()}"
        return derived
