"""The disclosure rules a node's operator sets in the ``[disclosure]`` table of ``config.toml``.

This module holds the rules as a validated value (:class:`DisclosureRules`), the one-line help
for each rule (written into ``config.toml`` by ``fedlab node init``) and a readable description
for the node's log. What each rule does to a reply, and why, is told in
:mod:`fedlab.analytics.disclosure`, which applies them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from fedlab.errors import FedlabConfigError, FedlabDisclosureError

__all__ = ["MIN_MAX_MODES", "RULE_HELP", "DisclosureRules", "check_enabled", "describe"]

MIN_MAX_MODES = ("off", "noisy", "exact")

# One line per rule: what it does. Used by describe() and by the config file writer.
RULE_HELP: dict[str, str] = {
    "enabled": "whether this node answers analytics requests at all (false: every one is refused)",
    "min_count": "a statistic over fewer than this many values (rows) is refused",
    "cell_threshold": "a histogram bin, value count or crosstab cell with 0 < count < this is suppressed "
    "(sent as None, 0 stays 0), plus one more cell wherever a single suppressed one could be recovered from a total",
    "max_bins_fraction": "a histogram over N values may have at most max(1, floor(this * N)) bins, "
    "else that histogram is refused",
    "min_max": 'min and max: "off" never sent, "noisy" sent moved outward by random noise, "exact" sent as they are',
    "min_max_noise": 'with min_max = "noisy": min is lowered and max raised by a random amount of up to '
    "this fraction of the column's range on this node",
    "excluded_columns": 'columns never summarised (identifiers, free text), e.g. ["patient_id", "notes"]; '
    "nor is any column derived from them",
    "levels_max": "a column with more distinct values than this is refused for value counts, crosstabs and one-hot "
    "encoding (DataSHIELD's nfilter.levels.max)",
    "levels_density": "... and so is a column with more distinct values than this fraction of its count "
    "(DataSHIELD's nfilter.levels.density)",
    "group_levels": "a column with at most this many distinct values defines groups: each group must hold at least "
    "min_count rows for a covariance or correlation with it, and its own moments need every group >= cell_threshold",
    "threshold_resolution": "quantile thresholds and histogram edges are rounded to a power-of-ten grid no finer than "
    "this fraction of the column's standard deviation",
    "threshold_allowance": "distinct thresholds and histogram edges one researcher may have answered per source "
    "column of each dataset, ever (kept in node.db, shared by every dataset derived from it)",
    "max_thresholds": "quantile thresholds plus histogram edges one request may hold",
    "max_onehot_categories": "categories a one-hot step may list for one column",
    "max_derived_cells": "rows x columns a preprocessing pipeline may produce",
    "max_concurrent": "analytics and preprocessing requests this node works on at once; more are refused at once",
}


def _bad(key: str, expected: str, value: object) -> FedlabConfigError:
    return FedlabConfigError(f"disclosure.{key} must be {expected}, not {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class DisclosureRules:
    """What this node lets out of analytics replies (see the module docstring for each rule).

    Every value is checked on construction; a wrong one raises FedlabConfigError naming the
    key (``disclosure.KEY``). ``excluded_columns`` may be given as any sequence of strings and
    is stored as a tuple; integer fractions are stored as floats.
    """

    enabled: bool = True
    min_count: int = 10
    cell_threshold: int = 3
    max_bins_fraction: float = 0.1
    min_max: str = "off"
    min_max_noise: float = 0.05
    excluded_columns: tuple[str, ...] = ()
    levels_max: int = 40
    levels_density: float = 0.33
    group_levels: int = 5
    threshold_resolution: float = 0.01
    threshold_allowance: int = 500
    max_thresholds: int = 2048
    max_onehot_categories: int = 100
    max_derived_cells: int = 20_000_000
    max_concurrent: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise _bad("enabled", "true or false", self.enabled)
        for key in ("min_count", "cell_threshold", "levels_max", "group_levels", "threshold_allowance",
                    "max_thresholds", "max_onehot_categories", "max_derived_cells", "max_concurrent"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _bad(key, "an integer >= 1", value)
        fraction = self.max_bins_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
            raise _bad("max_bins_fraction", "a number > 0 and <= 1", fraction)
        object.__setattr__(self, "max_bins_fraction", float(fraction))
        for key in ("levels_density", "threshold_resolution"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
                raise _bad(key, "a number > 0 and <= 1", value)
            object.__setattr__(self, key, float(value))
        if not isinstance(self.min_max, str) or self.min_max not in MIN_MAX_MODES:
            raise _bad("min_max", "one of " + ", ".join(f'"{m}"' for m in MIN_MAX_MODES), self.min_max)
        noise = self.min_max_noise
        if (
            isinstance(noise, bool)
            or not isinstance(noise, int | float)
            or not (noise > 0 and math.isfinite(noise))
        ):
            raise _bad("min_max_noise", "a finite number > 0", noise)
        object.__setattr__(self, "min_max_noise", float(noise))
        columns = self.excluded_columns
        if isinstance(columns, str) or not isinstance(columns, Sequence) or not all(
            isinstance(c, str) and c for c in columns
        ):
            raise _bad("excluded_columns", "a list of non-empty column names", columns)
        object.__setattr__(self, "excluded_columns", tuple(columns))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> DisclosureRules:
        """Build the rules from a ``[disclosure]`` table: absent keys take their defaults,
        unknown keys and wrong types or values raise FedlabConfigError naming the key."""
        if not isinstance(mapping, Mapping):
            raise FedlabConfigError(f"disclosure must be a table, not {type(mapping).__name__} {mapping!r}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(mapping) - set(allowed))
        if unknown:
            raise FedlabConfigError(
                f"disclosure has unknown key(s) {', '.join(unknown)}; allowed keys are {', '.join(allowed)}"
            )
        return cls(**mapping)


def check_enabled(rules: DisclosureRules) -> None:
    """Raise FedlabDisclosureError if analytics are switched off on this node."""
    if not rules.enabled:
        raise FedlabDisclosureError(
            "analytics are switched off on this node (rule disclosure.enabled = false); "
            "ask the node's operator if you need them"
        )


_SPECIAL = ("enabled", "min_count", "cell_threshold", "max_bins_fraction", "min_max", "min_max_noise",
            "excluded_columns")


def describe(rules: DisclosureRules) -> str:
    """The rules as readable lines (for the node's log and the CLI)."""
    values = {
        "enabled": "true" if rules.enabled else "false",
        "min_count": str(rules.min_count),
        "cell_threshold": str(rules.cell_threshold),
        "max_bins_fraction": repr(rules.max_bins_fraction),
        "min_max": f'"{rules.min_max}"',
        "min_max_noise": repr(rules.min_max_noise),
        "excluded_columns": json.dumps(list(rules.excluded_columns), ensure_ascii=False),
        **{key: repr(getattr(rules, key)) for key in RULE_HELP if key not in _SPECIAL},
    }
    lines = ["disclosure rules:"]
    for key, help_text in RULE_HELP.items():
        suffix = "" if key != "min_max_noise" or rules.min_max == "noisy" else " (unused: min_max is not noisy)"
        lines.append(f"  {key} = {values[key]}: {help_text}{suffix}")
    return "\n".join(lines)


