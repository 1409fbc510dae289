"""FederatedDataset: the datasets a tag search found, one per node, and the data-quality check.

The check follows Fed-BioMed's ``Job.check_data_quality``: CSV datasets must have the same
columns and dtypes on every node, or later statistics and training would silently mix
different things; image datasets whose shapes or channel counts differ only warrant a
warning (training plans usually resize). Two deliberate relaxations: integer and float
columns count as the same numeric kind, because a single missing value makes pandas read an
integer column as float on one site and not on another; and a column that is float64 on some
sites but of one non-numeric kind (text, bool) on all the others is only a
:class:`DataQualityWarning` naming those sites, because pandas reads a column without any
value (a measurement a site never made) as float64.

What the check can know is what a node's ``DatasetInfo`` carries: columns, dtypes, row counts,
never per-column missingness. So a *numeric* column that one site holds no value of looks like
any float column here; the preprocessing pipeline names such a site when a step is fitted
(``Pipeline.not_contributing``, with a DataQualityWarning), from the node's own "no values" answer.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from fedlab.errors import FedlabDataQualityError
from fedlab.protocol import DatasetInfo, to_builtins

__all__ = ["DataQualityWarning", "FederatedDataset", "check_data_quality"]


class DataQualityWarning(UserWarning):
    """Datasets on different nodes differ in a way training plans can usually absorb."""


def _kind(dtype: str) -> str:
    if dtype.startswith(("int", "uint", "float", "Int", "UInt", "Float")):
        return "numeric"
    return dtype


def check_data_quality(datasets: Mapping[str, DatasetInfo]) -> None:
    """Raise :class:`FedlabDataQualityError` (or warn) when the nodes' datasets disagree."""
    if len(datasets) < 2:
        return
    types = {n: d.data_type for n, d in datasets.items()}
    if len(set(types.values())) > 1:
        raise FedlabDataQualityError(
            "the datasets found are of different types: "
            + ", ".join(f"{n}: {t}" for n, t in types.items())
            + ". Give the search tags that select one kind of data."
        )
    data_type = next(iter(types.values()))
    if data_type == "csv":
        _check_tabular(datasets)
    elif data_type == "images":
        _check_images(datasets)


def _maybe_without_values(datasets: Mapping[str, DatasetInfo]) -> dict[str, list[str]]:
    """``{column: nodes}`` where the column is float64 on those nodes and of one non-numeric kind on
    every other node that has it: those nodes may hold no value of it (pandas reads such a column as
    float64), so the difference is not a structural one."""
    found: dict[str, list[str]] = {}
    columns = dict.fromkeys(c for info in datasets.values() for c in info.columns)
    for column in columns:
        holding = {n: info.dtypes.get(column, "") for n, info in datasets.items() if column in info.columns}
        blank = [n for n, dtype in holding.items() if dtype == "float64"]
        others = {_kind(dtype) for n, dtype in holding.items() if n not in blank}
        if blank and len(others) == 1 and "numeric" not in others:
            found[column] = blank
    return found


def _check_tabular(datasets: Mapping[str, DatasetInfo]) -> None:
    reference_node, reference = next(iter(datasets.items()))
    blank = _maybe_without_values(datasets)
    for column, nodes in blank.items():
        kinds = sorted({d.dtypes.get(column, "") for n, d in datasets.items()
                        if n not in nodes and column in d.columns})
        warnings.warn(
            f"column {column!r} is float64 on {', '.join(nodes)} but {', '.join(kinds)} on the other nodes: pandas "
            f"reads a column without any value as float64, so {', '.join(nodes)} may hold no value of it (a "
            "measurement never made there); preprocessing fits such a column on the nodes that have values. If "
            "it does hold numbers there, the nodes disagree on its type: align them",
            DataQualityWarning,
            stacklevel=4,
        )
    problems = []
    for node, info in datasets.items():
        if node == reference_node:
            continue
        missing = [c for c in reference.columns if c not in info.columns]
        extra = [c for c in info.columns if c not in reference.columns]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks columns {missing}")
            if extra:
                parts.append(f"has extra columns {extra}")
            problems.append(f"{node} {' and '.join(parts)} compared with {reference_node}")
        differing = [
            f"{c} ({info.dtypes.get(c)} vs {reference.dtypes.get(c)})"
            for c in reference.columns
            if c in info.columns and c not in blank
            and _kind(info.dtypes.get(c, "")) != _kind(reference.dtypes.get(c, ""))
        ]
        if differing:
            problems.append(f"{node} has different dtypes than {reference_node} for " + ", ".join(differing))
    if problems:
        raise FedlabDataQualityError(
            "the CSV datasets found do not share one structure: " + "; ".join(problems)
            + ". Align the columns on the nodes, or search with tags that select compatible datasets."
        )


def _check_images(datasets: Mapping[str, DatasetInfo]) -> None:
    shapes = {node: (tuple(d.image_shape), d.channels) for node, d in datasets.items()}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{n}: {s[0][0]}x{s[0][1]}x{s[1]}" if len(s[0]) == 2 else f"{n}: {s}"
                            for n, s in shapes.items())
        warnings.warn(
            f"image datasets differ in shape or channels ({listing}); the training plan must resize "
            "or convert them to one shape",
            DataQualityWarning,
            stacklevel=3,
        )


class FederatedDataset:
    """One dataset per node, as found by a search; knows which nodes did not take part and why.

    ``notes``: what a reader must know about how the datasets were made (for a preprocessing
    pipeline's result: the steps fitted without a node that holds no value of a column, an
    approximate median), in the pipeline's words.
    """

    def __init__(
        self,
        datasets: Mapping[str, DatasetInfo],
        *,
        node_names: Mapping[str, str] | None = None,
        missing: Mapping[str, str] | None = None,
        notes: Sequence[str] = (),
    ) -> None:
        self._datasets = dict(datasets)
        self._names = dict(node_names or {})
        self.missing: dict[str, str] = dict(missing or {})
        self.notes: list[str] = list(notes)

    def node_ids(self) -> list[str]:
        return list(self._datasets)

    def dataset(self, node_id: str) -> DatasetInfo:
        return self._datasets[node_id]

    def data(self) -> dict[str, dict[str, Any]]:
        """``{node_id: {"dataset_id", "name", "tags", "data_type", "shape", "columns", ...}}``."""
        return {node: to_builtins(info) for node, info in self._datasets.items()}

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for node, info in self._datasets.items():
            rows.append({
                "node_id": node,
                "node": self._names.get(node, node),
                "dataset_id": info.dataset_id,
                "name": info.name,
                "data_type": info.data_type,
                "tags": ", ".join(info.tags),
                "shape": tuple(info.shape),
                "n_samples": info.n_samples,
            })
        return pd.DataFrame(rows, columns=["node_id", "node", "dataset_id", "name", "data_type",
                                           "tags", "shape", "n_samples"])

    def __len__(self) -> int:
        return len(self._datasets)

    def __repr__(self) -> str:
        notes = f"; {'; '.join(self.notes)}" if self.notes else ""
        return f"FederatedDataset({len(self)} nodes: {', '.join(self.node_ids())}{notes})"

    def _repr_html_(self) -> str:
        return str(self.to_frame().to_html(index=False))
