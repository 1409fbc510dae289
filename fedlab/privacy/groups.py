"""Levels and groups: which value counts may be named, and which subsets a statistic may cover.

*Levels.* A value count names a level; a column with very many levels (an identifier, a
continuous measure) lists its individuals. Such a column (more than ``levels_max`` distinct
values, or more than ``levels_density`` x its count) is refused for value counts, crosstabs and
one-hot encoding, as DataSHIELD's ``nfilter.levels.max`` / ``nfilter.levels.density`` do.

*Suppressed levels, decided once per column.* A level held fewer than ``cell_threshold`` times
is suppressed, and if exactly one is, so is the smallest other positive level (else the column's
count would give it away). The set is computed from the column's own counts
(:func:`suppressed_levels`), so every value count and every crosstab over the column hides the
same levels; their names never leave the node.

*Groups.* A column with at most ``group_levels`` distinct values (a one-hot indicator, sex, a
short code) splits the rows into groups. A covariance with such a column is a sum over one group;
every group must then hold ``min_count`` rows. The column's own moments are its level counts (the
mean of a 0/1 column is a count), so they are released only when no level is suppressed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pandas as pd

from fedlab.analytics.disclosure import suppressed_levels as _suppressed
from fedlab.analytics.disclosure_rules import DisclosureRules

__all__ = ["LevelCounts", "group_refusal", "level_counts", "levels_refusal", "moments_refusal", "suppressed_levels"]


_EXACT_LEVELS = 10_000  # up to this many distinct values, the counts are made at once
_PROBE_ROWS = 50_000  # the first rows looked at to tell a continuous column at once


class LevelCounts(Mapping[str, int]):
    """Counts of the present values of a column keyed by ``str(value)``, as nodes key them.

    How many levels there are and how many values (``n_levels``, ``total``) is known at once;
    the counts themselves are made only when read. Most questions (too many levels to list? few
    enough to form groups?) need only the first, and a continuous column of 11 million rows has
    11 million levels: keying each by its string, in Python, took minutes per column, and even
    hashing them all takes seconds. So the first rows are looked at first: when they already
    hold more than ``_EXACT_LEVELS`` levels, ``n_levels`` is that lower bound (``exact`` False),
    which answers every question but an operator's limit above it (``count_levels`` then counts).
    """

    def __init__(self, series: pd.Series) -> None:
        self._present = series.dropna()
        self.total = len(self._present)
        self._counts: dict[str, int] | None = None
        # Hashing 11 million floats takes seconds per column: a first slice that already holds more
        # levels than are ever listed settles every question but the operator's very large limits.
        probe = int(self._present.iloc[:_PROBE_ROWS].nunique()) if self.total else 0
        self.n_levels = probe  # when not exact: a lower bound, made exact by count_levels()
        self.exact = probe <= _EXACT_LEVELS
        if self.exact:
            if self.total > _PROBE_ROWS:
                self.n_levels = int(self._present.nunique())
            if self.n_levels <= _EXACT_LEVELS:  # cheap: count now, so the number of levels is exactly the keys'
                self.n_levels = len(self._all())

    def count_levels(self) -> int:
        """The exact number of levels (one hashing pass over the whole column)."""
        if not self.exact:
            self.n_levels, self.exact = int(self._present.nunique()), True
        return self.n_levels

    def _all(self) -> dict[str, int]:
        if self._counts is None:
            counts: dict[str, int] = {}
            for value, n in self._present.value_counts(sort=False).items():
                key = str(value)  # values of different types may print alike (1 and "1"): one level, as before
                counts[key] = counts.get(key, 0) + int(n)
            self._counts = {k: n for k, n in counts.items() if n}
        return self._counts

    def __len__(self) -> int:
        return len(self._counts) if self._counts is not None else self.n_levels

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __getitem__(self, key: str) -> int:
        return self._all()[key]


def level_counts(series: pd.Series) -> LevelCounts:
    """The level counts of ``series`` (see :class:`LevelCounts`)."""
    return LevelCounts(series)


def _total(counts: Mapping[str, int]) -> int:
    return counts.total if isinstance(counts, LevelCounts) else sum(counts.values())


def suppressed_levels(counts: Mapping[str, int], threshold: int) -> set[str]:
    """Primary (0 < n < threshold) and secondary suppression, from the column's own counts."""
    return _suppressed(counts, threshold)


def levels_refusal(column: str, counts: Mapping[str, int], rules: DisclosureRules) -> str | None:
    """Why ``column`` has too many levels to be listed, or None."""
    n_levels, total = len(counts), _total(counts)
    if isinstance(counts, LevelCounts) and not counts.exact and n_levels <= rules.levels_max:
        n_levels = counts.count_levels()  # an operator's limit above the lower bound: count them all
    at_least = "at least " if isinstance(counts, LevelCounts) and not counts.exact else ""
    if n_levels > rules.levels_max:
        return (f"levels_max: {column} has {at_least}{n_levels} distinct values, more than this node's maximum of "
                f"{rules.levels_max} (disclosure.levels_max)")
    if total and n_levels > rules.levels_density * total:
        return (f"levels_density: {column} has {at_least}{n_levels} distinct values for {total} values, more than "
                f"{rules.levels_density} of them (disclosure.levels_density)")
    return None


def is_grouping(counts: Mapping[str, int], rules: DisclosureRules) -> bool:
    return 0 < len(counts) <= rules.group_levels


def group_refusal(column: str, counts: Mapping[str, int], rules: DisclosureRules) -> str | None:
    """Why a covariance with ``column`` would cover too small a group, or None."""
    if not is_grouping(counts, rules):
        return None
    small = min(counts.values())
    if small < rules.min_count:
        return (f"group_levels: {column} has {len(counts)} distinct values and so defines groups; one holds "
                f"fewer than this node's minimum of {rules.min_count} rows (disclosure.group_levels, "
                "disclosure.min_count)")
    return None


def moments_refusal(column: str, counts: Mapping[str, int], rules: DisclosureRules) -> str | None:
    """Why the moments of a few-level ``column`` would give away a suppressed level count, or None."""
    if not is_grouping(counts, rules) or not suppressed_levels(counts, rules.cell_threshold):
        return None
    return (f"group_levels: {column} has only {len(counts)} distinct values and one is held fewer than "
            f"{rules.cell_threshold} times; its sum, mean or variance would give that count away "
            "(disclosure.group_levels, disclosure.cell_threshold)")
