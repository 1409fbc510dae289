"""Plots and static display bundles: what a saved notebook shows without a kernel."""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")
w = pytest.importorskip("ipywidgets")

from matplotlib.figure import Figure  # noqa: E402

from fedlab.notebook.display import append, bundle, figure_png  # noqa: E402
from fedlab.notebook.plots import histogram_figure, loss_figure, validation_metrics, weighted_by_round  # noqa: E402


def history(with_validation=True):
    rows = []
    for round_ in (1, 2, 3):
        for i, node in enumerate(["site-a", "site-b"]):
            row = {"round": round_, "kind": "training", "node_id": f"id-{i}", "node": node, "status": "ok",
                   "reason": None, "n_samples": 100 * (i + 1), "n_test_samples": 10 * (i + 1), "n_updates": 4,
                   "train_loss": 1.0 / round_ + i}
            if with_validation:
                row.update(global_loss=0.9 / round_ + i, global_accuracy=0.5 + 0.1 * round_, local_loss=0.8 / round_)
            rows.append(row)
    rows.append({**rows[-1], "round": 3, "node": "site-c", "node_id": "id-c", "status": "missing",
                 "train_loss": None, "n_samples": 0})
    return pd.DataFrame(rows)


def test_weighted_by_round_weights_by_samples():
    frame = history()
    mean = weighted_by_round(frame[frame["status"] == "ok"], "train_loss", "n_samples")
    assert mean.loc[1] == pytest.approx((1.0 * 100 + 2.0 * 200) / 300)
    assert list(mean.index) == [1, 2, 3]


def test_validation_metrics_found_from_prefixed_columns_loss_first():
    assert validation_metrics(history()) == ["loss", "accuracy"]
    assert validation_metrics(history(with_validation=False)) == []


def test_loss_figure_has_a_panel_per_metric_with_node_and_global_curves():
    figure = loss_figure(history())
    assert isinstance(figure, Figure)
    training, loss, accuracy = figure.axes
    assert training.get_title() == "training loss"
    labels = [line.get_label() for line in training.get_lines()]
    assert labels == ["site-a", "site-b", "global (weighted)"]  # the missing node has no points
    assert loss.get_title() == "validation loss" and accuracy.get_title() == "validation accuracy"
    assert len(loss.get_lines()) == 6  # per node and weighted, for global_ and local_
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["weighted, global model",
                                                                    "weighted, after local training"]
    assert training.get_lines()[0].get_color() == loss.get_lines()[0].get_color()  # a node keeps its colour
    assert figure_png(figure).startswith(b"\x89PNG")


def test_loss_figure_without_validation_is_one_panel():
    assert len(loss_figure(history(with_validation=False)).axes) == 1


class HistResult:
    def histogram(self, column):
        frame = pd.DataFrame({"left": [0.0, 1.0, 2.0], "right": [1.0, 2.0, 3.0], "count": [5.0, 0.0, 7.0],
                              "suppressed_on": ["", "site-b", ""], "nodes": 2})
        frame.attrs["withheld_by"] = ["site-c"]
        return frame


def test_histogram_figure_marks_suppressed_bins_and_names_who_withheld():
    figure = histogram_figure(HistResult(), "age")
    (ax,) = figure.axes
    assert ax.get_title() == "age (2 nodes; withheld by site-c)"
    heights = [p.get_height() for p in ax.patches]
    assert heights[:3] == [5.0, 0.0, 7.0] and len(heights) == 4  # the hatched marker for the suppressed bin
    assert np.isclose(heights[3], 0.35)


def test_bundles_for_frames_figures_and_html_objects():
    frame = pd.DataFrame({"a": [1, 2]})
    assert 'class="dataframe' in bundle(frame)["text/html"]
    png = bundle(loss_figure(history()))["image/png"]
    assert base64.b64decode(png).startswith(b"\x89PNG")

    class WithHtml:
        def _repr_html_(self):
            return "<b>x</b>"

    assert bundle(WithHtml())["text/html"] == "<b>x</b>"
    assert bundle("plain") == {"text/plain": "plain"}


def test_append_adds_display_data_and_streams():
    out = w.Output()
    append(out, pd.DataFrame({"a": [1]}), "note")
    append(out, "went wrong", stream="stderr")
    assert [o["output_type"] for o in out.outputs] == ["display_data", "display_data", "stream"]
    assert out.outputs[-1] == {"output_type": "stream", "name": "stderr", "text": "went wrong\n"}
    w.Widget.close_all()
