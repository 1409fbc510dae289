"""Column provenance: which source columns a derived column came from, and which rows are real.

A node answers statistics on its source data transformed by a researcher's preprocessing chain.
The rules must follow the data, not the column names: ``age`` standardized is still ``age``,
``dx=RARE`` is ``dx``, and an imputed value is not a value anyone measured. :func:`initial` gives
every source column its own origin; :func:`track` carries the origins through one (already
validated) transform spec. Pure: the spec format is the one of
:mod:`fedlab.preprocessing.transforms`, read here without importing it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["INDICATOR", "VALUE", "Origin", "initial", "no_measured_values", "onehot_names", "sources_of", "track"]

#: A column whose values are (an increasing affine map of) a source column's values.
VALUE = "value"
#: A 0/1 column marking the rows of one level of a source column (one-hot encoding).
INDICATOR = "indicator"
OTHER_CATEGORY = "<other>"


@dataclass(frozen=True)
class Origin:
    """Where one column of a (possibly derived) frame comes from.

    ``sources``: the source dataset's columns it was computed from; ``kind``: VALUE or INDICATOR;
    ``real``: per row, whether the row's value comes from a real (present, not imputed) source value;
    ``scale``/``shift``: on real rows, ``value = scale * source value + shift`` (scale > 0) for a VALUE
    column, so that thresholds can be judged, and rounded, in the source's own units.
    """

    sources: frozenset[str]
    kind: str
    real: np.ndarray
    scale: float = 1.0
    shift: float = 0.0

    def to_source(self, value: float) -> float:
        return (value - self.shift) / self.scale

    def from_source(self, value: float) -> float:
        return value * self.scale + self.shift

    @property
    def real_count(self) -> int:
        return int(self.real.sum())

    @property
    def source(self) -> str:
        """The one source column (every transform here maps one column to one or several)."""
        return min(self.sources)


def initial(frame: pd.DataFrame) -> dict[str, Origin]:
    """Every column of a source dataset is its own source; its real rows are its present ones."""
    return {str(c): Origin(frozenset({str(c)}), VALUE, frame[c].notna().to_numpy(dtype=bool)) for c in frame.columns}


def no_measured_values(origin: Origin, source: pd.DataFrame) -> bool:
    """Whether the root ``source`` holds no measured value of the column(s) ``origin`` comes from,
    in any of its rows: the one case in which a node answers "no values" instead of a
    ``min_count`` refusal (a site that never measured a lab value).

    It is judged on the root source, never on the derived frame: a researcher's own steps can fill
    a column (imputed values are not measured ones, so they do not count) but must not be able to
    make one *read* as empty, so a column with any measured value (a real row) is never "no
    values", whatever the steps turned it into.
    """
    if origin.real.any():
        return False
    return all(s in source.columns and not bool(source[s].notna().any()) for s in origin.sources)


def onehot_names(column: str, categories: Sequence[str], other: bool) -> list[str]:
    """The columns a one-hot step makes of ``column``, in order."""
    return [f"{column}={v}" for v in categories] + ([f"{column}={OTHER_CATEGORY}"] if other else [])


def track(origins: Mapping[str, Origin], spec: Mapping[str, Any]) -> dict[str, Origin]:
    """The origins after applying ``spec`` (a validated spec), in the frame's column order.

    standardize, minmax and combat map real values to real values and impute fills rows that
    were not real: none of them changes a column's origin. One-hot replaces a column by
    indicator columns that share its sources and real rows.
    """
    kind = spec.get("type")
    if kind in _AFFINE:
        out_affine = dict(origins)
        for name in spec["columns"]:
            a, b = _AFFINE[str(kind)](spec, name)
            o = origins[name]
            out_affine[name] = Origin(o.sources, o.kind, o.real, o.scale * a, o.shift * a + b)
        return out_affine
    if kind != "onehot":
        return dict(origins)
    out: dict[str, Origin] = {}
    columns = set(spec["columns"])
    for name, origin in origins.items():
        if name not in columns:
            out[name] = origin
            continue
        for new in onehot_names(name, spec["categories"][name], bool(spec["other"][name])):
            out[new] = Origin(origin.sources, INDICATOR, origin.real)
    return out


def _divisor(value: float) -> float:
    return value if value != 0 else 1.0  # a zero scale or range divides by 1, as the transforms do


def _standardize(spec: Mapping[str, Any], c: str) -> tuple[float, float]:
    s = _divisor(float(spec["scale"][c]))
    return 1.0 / s, -float(spec["mean"][c]) / s


def _minmax(spec: Mapping[str, Any], c: str) -> tuple[float, float]:
    lo = float(spec["min"][c])
    d = _divisor(float(spec["max"][c]) - lo)
    return 1.0 / d, -lo / d


def _combat(spec: Mapping[str, Any], c: str) -> tuple[float, float]:
    alpha, sigma = float(spec["alpha"][c]), float(spec["sigma"][c])
    gamma, root = float(spec["gamma_star"][c]), float(spec["delta_star"][c]) ** 0.5
    return 1.0 / root, alpha - (alpha + sigma * gamma) / root


# value = a * previous value + b, per transform type: (a, b) for one column of a validated spec
_AFFINE = {"standardize": _standardize, "minmax": _minmax, "combat": _combat}


def sources_of(origins: Mapping[str, Origin], columns: Iterable[str]) -> set[str]:
    """The source columns behind ``columns`` (a column without an origin is its own source)."""
    found: set[str] = set()
    for c in columns:
        origin = origins.get(c)
        found |= set(origin.sources) if origin is not None else {c}
    return found
