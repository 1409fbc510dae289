"""Global parameters of a preprocessing step from merged node statistics (the researcher's side).

Each function turns what :mod:`fedlab.analytics.merge` made of the nodes' partials into the
transform spec (see :mod:`fedlab.preprocessing.transforms`) that every node then applies, so
that the nodes' transformed parts, put together, equal the transform fitted on pooled data.
Nothing here sees a row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedlab.analytics.merge import MergedCategorical, MergedNumeric
from fedlab.analytics.partials import MISSING_KEY
from fedlab.errors import FedlabConfigError, FedlabError

__all__ = [
    "IMPUTE_STRATEGIES",
    "combat_global_params",
    "impute_params",
    "minmax_params",
    "onehot_params",
    "standardize_params",
]

IMPUTE_STRATEGIES = ("mean", "median", "most_frequent")


def _require_values(column: str, merged: MergedNumeric, what: str) -> None:
    if merged.count == 0:
        raise FedlabError(f"{what} cannot be fitted on column {column!r}: no node holds a value of it")


def standardize_params(merged: Mapping[str, MergedNumeric]) -> dict[str, Any]:
    """Spec for ``standardize``: the pooled mean and the population std (ddof=0, as StandardScaler).

    A single value has a std of 0 (the merged ddof=1 variance is NaN there), which the
    transform, like StandardScaler, treats as 1.
    """
    mean: dict[str, float] = {}
    scale: dict[str, float] = {}
    for column, m in merged.items():
        _require_values(column, m, "standardize")
        mean[column] = m.mean
        scale[column] = math.sqrt(m.var * (m.count - 1) / m.count) if m.count >= 2 else 0.0
    return {"type": "standardize", "columns": list(merged), "mean": mean, "scale": scale}


def minmax_params(merged: Mapping[str, MergedNumeric], *, withheld: Sequence[str] = ()) -> dict[str, Any]:
    """Spec for ``minmax``; the exact min and max must have come from every node holding values."""
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for column, m in merged.items():
        _require_values(column, m, "min-max scaling")
        if m.min is None or m.max is None:
            who = f"the node(s) {', '.join(withheld)}" if withheld else "some nodes"
            raise FedlabError(f"min-max scaling of {column!r} needs exact min and max; {who} release them "
                              'only with disclosure.min_max = "exact"')
        lo[column], hi[column] = m.min, m.max
    return {"type": "minmax", "columns": list(merged), "min": lo, "max": hi}


def impute_params(
    strategy: str,
    merged_numeric: Mapping[str, MergedNumeric],
    merged_categorical: Mapping[str, MergedCategorical],
    medians: Mapping[str, float] | None,
) -> dict[str, Any]:
    """Spec for ``impute``: columns of ``merged_numeric`` for "mean"/"median" (the median comes
    from ``medians``, found by the caller's quantile search), of ``merged_categorical`` for
    "most_frequent".

    Most frequent is the value with the highest *disclosed* merged count (a value every node
    suppressed cannot be chosen: it was never revealed; levels a node withheld without naming
    them are too rare there to change the choice by more than their few values). Value counts
    are keyed by ``str``;
    when every disclosed key of a column reads as a finite number the column is taken as
    numeric: the value is returned as a float and ties are broken by the smallest number, as
    scikit-learn's SimpleImputer does. Otherwise the value stays a string and ties go to the
    smallest string.
    """
    if strategy not in IMPUTE_STRATEGIES:
        raise FedlabConfigError(f"impute strategy must be one of {list(IMPUTE_STRATEGIES)}, not {strategy!r}")
    values: dict[str, Any] = {}
    if strategy == "most_frequent":
        for column, mc in merged_categorical.items():
            values[column] = _most_frequent(column, mc)
        return {"type": "impute", "columns": list(merged_categorical), "values": values}
    for column, m in merged_numeric.items():
        _require_values(column, m, "imputation")
        if strategy == "mean":
            values[column] = m.mean
        else:
            if medians is None or column not in medians:
                raise FedlabError(f"median imputation of {column!r} needs its median; none was given")
            values[column] = float(medians[column])
    return {"type": "impute", "columns": list(merged_numeric), "values": values}


def _as_number(key: str) -> float | None:
    try:
        value = float(key)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _most_frequent(column: str, merged: MergedCategorical) -> str | float:
    counts = {k: n for k, n in merged.value_counts.items() if k != MISSING_KEY and n > 0}
    if not counts:
        raise FedlabError(f"most-frequent imputation of {column!r}: no node disclosed any value count "
                          "(all were missing or suppressed by disclosure rules)")
    numbers = {k: _as_number(k) for k in counts}
    if all(v is not None for v in numbers.values()):
        number_counts = [(n, x) for k, n in counts.items() if (x := numbers[k]) is not None]
        return min(number_counts, key=lambda nx: (-nx[0], nx[1]))[1]
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def onehot_params(merged_categorical: Mapping[str, MergedCategorical]) -> dict[str, Any]:
    """Spec for ``onehot``: the sorted union of the values any node disclosed, and always an
    ``<other>`` column: a node folds there the values outside the categories, among them those
    it or another node suppressed (never named) and those it holds too rarely to encode, so every
    node needs the column for the derived datasets to share one schema."""
    categories: dict[str, list[str]] = {}
    other: dict[str, bool] = {}
    for column, mc in merged_categorical.items():
        categories[column] = sorted(k for k, n in mc.value_counts.items() if k != MISSING_KEY and n > 0)
        other[column] = True
    return {"type": "onehot", "columns": list(merged_categorical), "categories": categories, "other": other}


def combat_global_params(
    per_node_moments: Mapping[str, Mapping[str, tuple[int, float, float]]],
) -> dict[str, dict[str, float]]:
    """ComBat's global ``alpha`` (pooled mean) and ``sigma`` per column from each node's
    ``(n, mean, M2)`` of its batch.

    ``sigma² = Σ M2_i / N`` is the pooled *within-batch* variance divided by N, as neuroCombat
    computes ``var_pooled`` without covariates (the residuals of the batch-means regression);
    the between-batch spread is what ComBat removes, so it must not enter sigma.
    """
    columns: list[str] = []
    for moments in per_node_moments.values():
        columns.extend(c for c in moments if c not in columns)
    alpha: dict[str, float] = {}
    sigma: dict[str, float] = {}
    nodes = sorted(per_node_moments)
    for column in columns:
        parts = [per_node_moments[node][column] for node in nodes if column in per_node_moments[node]]
        parts = [(int(n), float(mean), float(m2)) for n, mean, m2 in parts if n]
        total = sum(n for n, _, _ in parts)
        if total == 0:
            raise FedlabError(f"ComBat cannot be fitted on column {column!r}: no node holds a value of it")
        alpha[column] = math.fsum(n * mean for n, mean, _ in parts) / total
        sigma[column] = math.sqrt(math.fsum(m2 for _, _, m2 in parts) / total)
        if not sigma[column] > 0:
            raise FedlabError(f"ComBat cannot be fitted on column {column!r}: it does not vary within any "
                              "node (pooled within-batch variance 0)")
    return {"alpha": alpha, "sigma": sigma}
