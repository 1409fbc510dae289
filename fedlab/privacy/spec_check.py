"""Validation of a researcher-sent transform spec against the node's own rules and data.

A ``set`` step of a preprocessing pipeline carries a transform spec that the researcher made
(or hand-wrote). Before the node keeps it, :func:`check_spec` makes sure that

* no step touches an excluded column, or a column derived from one (``disclosure.excluded_columns``);
* every value transform is increasing: a standardize scale and a min-max range must be >= 0, a
  ComBat sigma > 0 (so that derived values keep the ranks of their source, which the cut rules of
  :mod:`.cuts` rely on), and every parameter is a finite number;
* a one-hot step encodes only value columns with few enough levels (``levels_max``,
  ``levels_density``), lists at most ``max_onehot_categories`` categories, and the levels this
  node must suppress (see :func:`fedlab.privacy.groups.suppressed_levels`) are *folded* into
  ``<other>``: the spec gets ``folded[column]``, the list of those levels, and ``other = true``,
  whatever the researcher sent; their indicator columns stay, all zeros, so every node keeps
  one schema;
* the derived frame stays under ``max_derived_cells`` (rows x columns).

Once the node has applied a kept value spec, :func:`check_finite` makes sure that it turned no
finite value into an infinity or a missing value (floating-point overflow, with parameters of
extreme magnitude), since the count of what is left would then count the values in an interval the
researcher chose, outside the cut rules.

:func:`check_spec` returns the spec the node will keep; a refusal is a :class:`FedlabDisclosureError` naming the
rule and never quoting a value from the data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from fedlab.analytics.disclosure_rules import DisclosureRules
from fedlab.errors import FedlabConfigError, FedlabDisclosureError
from fedlab.privacy.groups import level_counts, levels_refusal, suppressed_levels
from fedlab.privacy.provenance import VALUE, Origin, sources_of

__all__ = ["check_finite", "check_spec"]

_NUMERIC_PARAMS = {
    "standardize": ("mean", "scale"),
    "minmax": ("min", "max"),
    "combat": ("alpha", "sigma"),
}


def _finite(spec: Mapping[str, Any], key: str, column: str) -> float:
    table = spec.get(key)
    value = table.get(column) if isinstance(table, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FedlabConfigError(f"the {spec['type']} transform's {key}[{column!r}] must be a finite number")
    return float(value)


def check_spec(spec: Mapping[str, Any], frame: pd.DataFrame, origins: Mapping[str, Origin],
               rules: DisclosureRules) -> dict[str, Any]:
    """The spec this node will keep for ``frame`` (the data before the step), or a refusal."""
    kind = spec.get("type")
    columns = spec.get("columns")
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns) or not columns:
        raise FedlabConfigError(f"a {kind} transform needs 'columns', a non-empty list of column names")
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise FedlabConfigError(f"the {kind} transform's columns {absent} are not in the data after the "
                                f"pipeline's steps so far (columns: {list(frame.columns)})")
    excluded = sorted(sources_of(origins, columns) & set(rules.excluded_columns))
    if excluded:
        raise FedlabDisclosureError(
            f"excluded_columns: the {kind} step uses {', '.join(excluded)} (or a column made from it), which "
            "this node's operator excluded from every statistic and transform (disclosure.excluded_columns)")
    out = dict(spec)
    if kind in _NUMERIC_PARAMS:
        first, second = _NUMERIC_PARAMS[str(kind)]
        for c in columns:
            if origins[c].kind != VALUE:
                raise FedlabDisclosureError(f"a {kind} step applies to value columns; {c} is a one-hot indicator")
            a, b = _finite(spec, first, c), _finite(spec, second, c)
            if kind == "standardize" and b < 0:
                raise FedlabDisclosureError(f"standardize needs a scale >= 0 for {c!r}: a negative scale would "
                                            "reverse the column's order, which this node does not allow")
            if kind == "minmax" and b < a:
                raise FedlabDisclosureError(f"min-max scaling needs max >= min for {c!r}: a reversed range "
                                            "would reverse the column's order, which this node does not allow")
            if kind == "combat" and not b > 0:
                raise FedlabConfigError(f"the combat transform needs sigma > 0 for {c!r}")
    elif kind == "onehot":
        out = _check_onehot(spec, frame, origins, rules)
    n_columns = len(frame.columns) + (_added_columns(out) if kind == "onehot" else 0)
    if len(frame) * n_columns > rules.max_derived_cells:
        raise FedlabDisclosureError(
            f"max_derived_cells: the {kind} step would make {len(frame)} rows x {n_columns} columns, more than "
            f"this node's maximum of {rules.max_derived_cells} cells (disclosure.max_derived_cells)")
    return out


def _added_columns(spec: Mapping[str, Any]) -> int:
    return sum(len(spec["categories"][c]) + (1 if spec["other"][c] else 0) - 1 for c in spec["columns"])


def _check_onehot(spec: Mapping[str, Any], frame: pd.DataFrame, origins: Mapping[str, Origin],
                  rules: DisclosureRules) -> dict[str, Any]:
    categories, other = spec.get("categories"), spec.get("other")
    if not isinstance(categories, Mapping) or not isinstance(other, Mapping):
        raise FedlabConfigError("a onehot transform needs 'categories' and 'other', dicts from column name")
    folded: dict[str, list[str]] = {}
    new_other: dict[str, bool] = {}
    for c in spec["columns"]:
        listed = categories.get(c)
        if not isinstance(listed, list) or not all(isinstance(v, str) for v in listed):
            raise FedlabConfigError(f"the onehot transform's categories[{c!r}] must be a list of strings")
        if len(listed) > rules.max_onehot_categories:
            raise FedlabDisclosureError(
                f"max_onehot_categories: the onehot step lists {len(listed)} categories for {c}, more than this "
                f"node's maximum of {rules.max_onehot_categories} (disclosure.max_onehot_categories)")
        if len(set(listed)) != len(listed):
            raise FedlabConfigError(f"the onehot transform's categories[{c!r}] lists a category twice")
        if not isinstance(other.get(c), bool):
            raise FedlabConfigError(f"the onehot transform's other[{c!r}] must be true or false")
        if origins[c].kind != VALUE:
            raise FedlabDisclosureError(f"a onehot step applies to value columns; {c} is already an indicator")
        counts = level_counts(frame[c])
        if (why := levels_refusal(c, counts, rules)) is not None:
            raise FedlabDisclosureError(f"{why}; it cannot be one-hot encoded on this node")
        hidden = suppressed_levels(counts, rules.cell_threshold)
        folded[c] = sorted(v for v in listed if v in hidden)
        # rows of unlisted and folded levels go to <other>: always made, so every node has it
        new_other[c] = True
    return {**spec, "other": new_other, "folded": folded}


def check_finite(spec: Mapping[str, Any], before: pd.DataFrame, after: pd.DataFrame) -> None:
    """Refuse a standardize, min-max or ComBat step that turns a finite value of one of its columns
    into an infinity or a missing value (``before``/``after``: the frame without and with the step).

    With a scale of 1e-307 the values far from the mean overflow to infinity, and a min-max range
    of +-1e308 then makes them NaN while the others stay finite: the column's non-missing count
    would be the count of values within a researcher-chosen distance of a point, answered exactly
    and without the cut rules. Parameters fitted on the data never come near this.
    """
    kind = spec.get("type")
    if kind not in _NUMERIC_PARAMS:
        return
    for c in spec.get("columns", []):
        x = pd.to_numeric(before[c], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        y = pd.to_numeric(after[c], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        if bool(np.any(np.isfinite(x) & ~np.isfinite(y))):
            raise FedlabDisclosureError(
                f"the {kind} step's parameters for {c!r} overflow: they turn some of its values into infinities "
                "or missing values, so the count of what is left would count the values in an interval; this "
                "node refuses such parameters. Use parameters on the scale of the data, as a fit gives")
