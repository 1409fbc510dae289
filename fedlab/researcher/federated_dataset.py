"""FederatedDataset: the datasets a tag search found, one per node, and the data-quality check.

The check follows the seed's ``Job.check_data_quality``: CSV datasets must have the same
columns and dtypes on every node, or later statistics and training would silently mix
different things; image datasets whose shapes or channel counts differ only warrant a
warning (training plans usually resize). One deliberate relaxation: integer and float
columns count as the same numeric kind, because a single missing value makes pandas read an
integer column as float on one site and not on another.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
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


def _check_tabular(datasets: Mapping[str, DatasetInfo]) -> None:
    reference_node, reference = next(iter(datasets.items()))
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
            if c in info.columns and _kind(info.dtypes.get(c, "")) != _kind(reference.dtypes.get(c, ""))
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
    """One dataset per node, as found by a search; knows which nodes did not take part and why."""

    def __init__(
        self,
        datasets: Mapping[str, DatasetInfo],
        *,
        node_names: Mapping[str, str] | None = None,
        missing: Mapping[str, str] | None = None,
    ) -> None:
        self._datasets = dict(datasets)
        self._names = dict(node_names or {})
        self.missing: dict[str, str] = dict(missing or {})

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
        return f"FederatedDataset({len(self)} nodes: {', '.join(self.node_ids())})"

    def _repr_html_(self) -> str:
        return str(self.to_frame().to_html(index=False))
