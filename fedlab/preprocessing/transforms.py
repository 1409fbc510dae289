"""Transform specs and applying them to a node's DataFrame.

A spec is a plain JSON-able dict: it travels in ``preproc_args["transform"]`` and is stored in
the node's SQLite state, so it holds only str keys, lists, numbers, strings and bools. Every
spec has a ``type`` and the ``columns`` it acts on, plus per-column parameters keyed by column
name; what each type computes is documented on its ``_apply_*`` function.

Specs are validated when applied (not trusted because the researcher made them: they come off
the wire) and every problem is a :class:`~fedlab.errors.FedlabConfigError` that says which key
or column is wrong. Applying never mutates the input frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from fedlab.errors import FedlabConfigError

__all__ = ["OTHER_CATEGORY", "apply_chain", "apply_transform", "describe_spec"]

#: The one-hot category that groups present values outside the spec's categories.
OTHER_CATEGORY = "<other>"

# per-column parameter keys each type needs (besides "type" and "columns")
_PARAMS: dict[str, tuple[str, ...]] = {
    "standardize": ("mean", "scale"),
    "minmax": ("min", "max"),
    "impute": ("values",),
    "onehot": ("categories", "other"),
    "combat": ("alpha", "sigma", "gamma_star", "delta_star"),
}


def describe_spec(spec: Mapping[str, Any]) -> str:
    """One line for a derived dataset's lineage, e.g. ``"standardize(age, bmi)"``; with the
    columns of which this node holds no value (``no_values``, which the node adds to its own copy
    of the spec), e.g. ``"standardize(age, chol; no values of chol here: fitted on the other sites)"``.

    Never raises: lineage is written after the spec was applied, and a description must not be
    what makes the derived dataset fail.
    """
    kind = spec.get("type", "?") if isinstance(spec, Mapping) else "?"
    columns = spec.get("columns", []) if isinstance(spec, Mapping) else []
    names = ", ".join(str(c) for c in columns) if isinstance(columns, list | tuple) else ""
    if kind == "impute" and isinstance(spec.get("values"), Mapping):
        names = ", ".join(f"{c}={_shown(spec['values'].get(c))}" for c in columns) if names else ""
    empty = spec.get("no_values") if isinstance(spec, Mapping) else None
    note = f"; no values of {', '.join(str(c) for c in empty)} here: fitted on the other sites" if (
        isinstance(empty, list | tuple) and empty) else ""
    return f"{kind}({names}{note})"


def _shown(value: Any) -> str:
    """A fill value as a reader wants it in a lineage line: ``25.7``, not ``25.70000000000003``
    (the float sum of a federated mean); the exact value is what the step applies."""
    if isinstance(value, float):
        return f"{value:.10g}"
    return repr(value)


def apply_chain(frame: pd.DataFrame, specs: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Apply ``specs`` in order; each acts on the output of the previous ones."""
    for spec in specs:
        frame = apply_transform(frame, spec)
    return frame


def apply_transform(frame: pd.DataFrame, spec: Mapping[str, Any]) -> pd.DataFrame:
    """A new frame with ``spec`` applied; raises FedlabConfigError for an invalid spec."""
    columns = _validate(frame, spec)
    out = frame.copy()
    return _APPLY[spec["type"]](out, columns, spec)


def _validate(frame: pd.DataFrame, spec: Mapping[str, Any]) -> list[str]:
    if not isinstance(spec, Mapping):
        raise FedlabConfigError(f"a transform spec must be a dict, not {type(spec).__name__}")
    kind = spec.get("type")
    if kind not in _PARAMS:
        raise FedlabConfigError(f"unknown transform type {kind!r}; known: {sorted(_PARAMS)}")
    columns = spec.get("columns")
    if not isinstance(columns, list | tuple) or not all(isinstance(c, str) for c in columns):
        raise FedlabConfigError(f"a {kind} transform needs 'columns', a list of column names")
    if len(set(columns)) != len(columns):
        raise FedlabConfigError(f"a {kind} transform lists a column twice: {list(columns)}")
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise FedlabConfigError(f"the {kind} transform's columns {absent} are not in the data "
                                f"(columns: {list(frame.columns)})")
    for key in _PARAMS[kind]:
        params = spec.get(key)
        if not isinstance(params, Mapping):
            raise FedlabConfigError(f"a {kind} transform needs {key!r}, a dict from column name to value")
        lacking = [c for c in columns if c not in params]
        if lacking:
            raise FedlabConfigError(f"the {kind} transform's {key!r} has no value for columns {lacking}")
    return list(columns)


def _number(spec: Mapping[str, Any], key: str, column: str) -> float:
    value = spec[key][column]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FedlabConfigError(f"the {spec['type']} transform's {key}[{column!r}] must be a number, not {value!r}")
    return float(value)


def _floats(frame: pd.DataFrame, column: str, kind: str) -> pd.Series:
    """The column as float64 (missing as NaN), or a clear error if it holds no numbers."""
    try:
        return pd.Series(pd.to_numeric(frame[column], errors="raise"), index=frame.index).astype(np.float64)
    except (TypeError, ValueError, OverflowError) as exc:  # its text quotes a cell: kept in the chain, never sent
        raise FedlabConfigError(f"{kind} needs a numeric column; {column!r} holds {frame[column].dtype} "
                                "values, some of which are not numbers; leave the column out of this "
                                "step or one-hot encode it") from exc


def _apply_standardize(out: pd.DataFrame, columns: list[str], spec: Mapping[str, Any]) -> pd.DataFrame:
    """(x - mean) / scale; a scale of 0 divides by 1, as scikit-learn's StandardScaler does."""
    for c in columns:
        mean, scale = _number(spec, "mean", c), _number(spec, "scale", c)
        out[c] = (_floats(out, c, "standardize") - mean) / (scale if scale != 0 else 1.0)
    return out


def _apply_minmax(out: pd.DataFrame, columns: list[str], spec: Mapping[str, Any]) -> pd.DataFrame:
    """(x - min) / (max - min); a range of 0 divides by 1, as scikit-learn's MinMaxScaler does."""
    for c in columns:
        lo, hi = _number(spec, "min", c), _number(spec, "max", c)
        out[c] = (_floats(out, c, "minmax") - lo) / ((hi - lo) if hi != lo else 1.0)
    return out


def _apply_impute(out: pd.DataFrame, columns: list[str], spec: Mapping[str, Any]) -> pd.DataFrame:
    """Missing values replaced by ``values[col]``.

    A numeric column takes a number: a value spelled as a string (a most-frequent value comes
    as a value-count key) is read back as a float, since a numeric column filled with a string
    would silently turn into text. Other columns take the value as it is, and so does a column
    without any value: pandas reads a column a site never measured as float, whatever the
    other sites hold, so its type says nothing.
    """
    for c in columns:
        value = spec["values"][c]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise FedlabConfigError(f"the impute transform's value for {c!r} is missing itself")
        series = out[c]
        missing = series.isna()
        if not missing.any():
            continue
        if isinstance(value, str) and missing.all():
            out[c] = pd.Series(value, index=out.index, dtype=object)
        elif pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
            try:
                number = float(value)
            except (TypeError, ValueError, OverflowError) as exc:
                # the value may be a most-frequent level read off the data: never echoed
                raise FedlabConfigError(f"column {c!r} is numeric; the impute transform's value for it is not "
                                        "a number, so it cannot be imputed with it; give a number") from exc
            out[c] = series.astype(np.float64).where(~missing, number)
        elif isinstance(value, str) and pd.api.types.is_string_dtype(series.dtype):
            out[c] = series.fillna(value)
        else:
            out[c] = series.astype(object).where(~missing, value)
    return out


def _apply_onehot(out: pd.DataFrame, columns: list[str], spec: Mapping[str, Any]) -> pd.DataFrame:
    """Each column replaced, at its position, by float 0/1 columns ``f"{col}={category}"``.

    Values are compared as ``str(value)``, the way nodes count them, so the categories the
    researcher saw are exactly the ones matched here. With ``other[col]`` a last column
    ``f"{col}=<other>"`` is 1 for present values outside the categories (values some node
    suppressed are grouped there, never named). A missing value gives all zeros.
    """
    for c in columns:
        categories, other = spec["categories"][c], spec["other"][c]
        if not isinstance(categories, list | tuple) or not all(isinstance(v, str) for v in categories):
            raise FedlabConfigError(f"the onehot transform's categories[{c!r}] must be a list of strings")
        if len(set(categories)) != len(categories):
            raise FedlabConfigError(f"the onehot transform's categories[{c!r}] lists a category twice")
        if not isinstance(other, bool):
            raise FedlabConfigError(f"the onehot transform's other[{c!r}] must be true or false")
        series = out[c]
        present = series.notna().to_numpy()
        keys = np.array([str(v) for v in series.tolist()], dtype=object)
        names = [f"{c}={v}" for v in categories] + ([f"{c}={OTHER_CATEGORY}"] if other else [])
        clash = [n for n in names if n in out.columns and n != c]
        if clash:
            raise FedlabConfigError(f"one-hot encoding {c!r} would overwrite existing columns {clash}")
        new: dict[str, np.ndarray] = {}
        known = np.zeros(len(series), dtype=bool)
        for value, name in zip(categories, names, strict=False):
            hit = present & (keys == value)
            known |= hit
            new[name] = hit.astype(np.float64)
        if other:
            new[names[-1]] = (present & ~known).astype(np.float64)
        position = list(out.columns).index(c)
        left: pd.DataFrame = out.iloc[:, list(range(position))]
        right: pd.DataFrame = out.iloc[:, list(range(position + 1, out.shape[1]))]
        out = pd.concat([left, pd.DataFrame(new, index=out.index), right], axis=1)
    return out


def _apply_combat(out: pd.DataFrame, columns: list[str], spec: Mapping[str, Any]) -> pd.DataFrame:
    """ComBat's adjustment of this node's batch (Johnson et al. 2007, no covariates):
    ``sigma * ((x - alpha) / sigma - gamma_star) / sqrt(delta_star) + alpha``."""
    for c in columns:
        alpha, sigma = _number(spec, "alpha", c), _number(spec, "sigma", c)
        gamma, delta = _number(spec, "gamma_star", c), _number(spec, "delta_star", c)
        if not sigma > 0 or not delta > 0:
            raise FedlabConfigError(f"the combat transform needs sigma > 0 and delta_star > 0 for {c!r}, "
                                    f"got sigma={sigma}, delta_star={delta}")
        z = (_floats(out, c, "combat") - alpha) / sigma
        out[c] = sigma * (z - gamma) / math.sqrt(delta) + alpha
    return out


_APPLY: dict[str, Callable[[pd.DataFrame, list[str], Mapping[str, Any]], pd.DataFrame]] = {
    "standardize": _apply_standardize,
    "minmax": _apply_minmax,
    "impute": _apply_impute,
    "onehot": _apply_onehot,
    "combat": _apply_combat,
}
