"""Matplotlib figures of results: training and validation curves, analytics histograms.

Figures are built on ``matplotlib.figure.Figure`` directly, never through pyplot: pyplot keeps
global state (the current figure, the interactive backend) that a background thread must not
touch, and a figure made this way is drawn by the Agg canvas wherever it is (a widget's
Output, a PNG in a saved notebook, a file).

The "global" curve of a round is the mean over the nodes that took part, weighted by their
sample counts: the same weighting FedAvg gives their parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["histogram_figure", "loss_figure", "validation_metrics", "weighted_by_round"]

MAX_METRIC_PANELS = 3


def _figure(n_panels: int, width: float = 5.0, height: float = 3.4) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * n_panels, height), layout="constrained")
    axes = figure.subplots(1, n_panels, squeeze=False)[0]
    return figure, list(axes)


def weighted_by_round(rows: pd.DataFrame, column: str, weight: str) -> pd.Series:
    """Per round, the mean of ``column`` over nodes weighted by ``weight`` (NaNs left out)."""
    data = rows[["round", column, weight]].dropna(subset=[column])
    if data.empty:
        return pd.Series(dtype="float64")
    weights = data[weight].astype("float64").where(data[weight] > 0, 1.0)
    summed = (data[column].astype("float64") * weights).groupby(data["round"]).sum()
    return summed / weights.groupby(data["round"]).sum()


def validation_metrics(history: pd.DataFrame) -> list[str]:
    """Metric names with values in the history, from ``global_<m>`` or ``local_<m>`` columns."""
    names: dict[str, None] = {}
    for column in history.columns:
        for prefix in ("global_", "local_"):
            if column.startswith(prefix) and history[column].notna().any():
                names[column[len(prefix):]] = None
    return sorted(names, key=lambda m: (m != "loss", m))


def _colours(nodes: list[str]) -> dict[str, Any]:
    """One colour per node, the same in every panel."""
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {node: palette(i % palette.N) for i, node in enumerate(nodes)}


def _per_node(ax: Axes, rows: pd.DataFrame, column: str, style: str, colours: dict[str, Any],
              label: bool = True) -> None:
    for node, part in rows.groupby("node", sort=True):
        part = part.dropna(subset=[column])
        if not part.empty:
            ax.plot(part["round"], part[column], style, color=colours.get(str(node)), alpha=0.7, linewidth=1.2,
                    marker="o", markersize=3, label=str(node) if label else "_nolegend_")


def loss_figure(history: pd.DataFrame) -> Figure:
    """Training loss per node and global per round; beside it each validation metric
    (``global_<m>``: the global model as a node received it, ``local_<m>``: after local training)."""
    ok = history[history["status"] == "ok"] if "status" in history else history
    metrics = validation_metrics(ok)[:MAX_METRIC_PANELS]
    figure, axes = _figure(1 + len(metrics))
    training = ok[ok["kind"] == "training"] if "kind" in ok else ok
    colours = _colours(sorted(map(str, ok["node"].unique())))
    ax = axes[0]
    if training["train_loss"].notna().any():
        _per_node(ax, training, "train_loss", "-", colours)
        overall = weighted_by_round(training, "train_loss", "n_samples")
        ax.plot(overall.index, overall.to_numpy(), "k-", linewidth=2.5, marker="s", label="global (weighted)")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no training loss yet", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="training loss", xlabel="round", ylabel="loss")
    for ax, metric in zip(axes[1:], metrics, strict=True):
        for prefix, style, what in (("global_", "-", "global model"), ("local_", "--", "after local training")):
            column = prefix + metric
            if column not in ok or not ok[column].notna().any():
                continue
            _per_node(ax, ok, column, style, colours, label=False)  # nodes: see the colours of the first panel
            overall = weighted_by_round(ok, column, "n_test_samples")
            ax.plot(overall.index, overall.to_numpy(), "k" + style, linewidth=2.5, marker="s",
                    label=f"weighted, {what}")
        ax.set(title=f"validation {metric}", xlabel="round", ylabel=metric)
        ax.legend(fontsize="small")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle("federated training")
    return figure


def histogram_figure(result: Any, column: str) -> Figure:
    """The federated histogram of ``column`` from an ``FAResult``: bins a node suppressed
    (too few rows) are hatched and named, so a gap never reads as zero."""
    frame = result.histogram(column)
    figure, (ax,) = _figure(1, width=6.0, height=3.6)
    widths = (frame["right"] - frame["left"]).to_numpy(dtype="float64")
    counts = frame["count"].to_numpy(dtype="float64")
    suppressed = frame["suppressed_on"].astype(bool).to_numpy()
    ax.bar(frame["left"], counts, width=widths, align="edge", color="tab:blue", edgecolor="white")
    if suppressed.any():
        top = float(np.nanmax(counts)) if np.isfinite(counts).any() else 1.0
        ax.bar(frame["left"][suppressed], np.full(int(suppressed.sum()), top * 0.05), width=widths[suppressed],
               align="edge", color="none", edgecolor="tab:red", hatch="//", label="suppressed on some node")
        ax.legend(fontsize="small")
    nodes = int(frame["nodes"].iloc[0]) if len(frame) else 0
    withheld = frame.attrs.get("withheld_by") or []
    subtitle = f"{nodes} nodes" + (f"; withheld by {', '.join(withheld)}" if withheld else "")
    ax.set(title=f"{column} ({subtitle})", xlabel=column, ylabel="count")
    ax.grid(alpha=0.3, axis="y")
    figure.suptitle(f"histogram of {column}")
    return figure
