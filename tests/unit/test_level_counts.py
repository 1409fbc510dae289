"""Level counts (fedlab.privacy.groups.LevelCounts): exact where it matters, fast on continuous columns."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedlab.analytics.disclosure_rules import DisclosureRules
from fedlab.privacy.groups import is_grouping, level_counts, levels_refusal


def test_counts_are_keyed_by_str_and_values_that_print_alike_are_one_level():
    counts = level_counts(pd.Series([1, "1", 2, None, 2, 2.5], dtype=object))
    assert dict(counts) == {"1": 2, "2": 2, "2.5": 1}
    assert len(counts) == 3 and counts.total == 5
    assert is_grouping(counts, DisclosureRules())


def test_a_continuous_column_is_sized_without_listing_its_levels():
    series = pd.Series(np.random.default_rng(0).normal(size=50_000))
    counts = level_counts(series)
    assert counts._counts is None  # nothing listed yet
    assert len(counts) == 50_000 and counts.total == 50_000
    why = levels_refusal("x", counts, DisclosureRules())
    assert why is not None and "50000 distinct values" in why
    assert counts._counts is None
    assert sum(counts.values()) == 50_000  # listing it on demand still works
    assert counts._counts is not None


def test_a_long_continuous_column_is_judged_from_its_first_rows_unless_the_limit_is_higher():
    values = np.random.default_rng(1).normal(size=200_000)
    counts = level_counts(pd.Series(values))
    assert not counts.exact and 10_000 < len(counts) <= 50_000  # a lower bound, from the first rows
    why = levels_refusal("x", counts, DisclosureRules())
    assert why is not None and "at least" in why
    assert not is_grouping(counts, DisclosureRules())
    # an operator who lists up to 100,000 levels gets the exact count, and the refusal it implies
    why = levels_refusal("x", counts, DisclosureRules(levels_max=100_000, levels_density=1.0))
    assert counts.exact and len(counts) == 200_000
    assert why is not None and "has 200000 distinct values" in why
    # a column whose first rows repeat but whose tail does not is counted in full
    tail = level_counts(pd.Series(np.concatenate([np.zeros(60_000), values])))
    assert tail.exact and len(tail) == 200_001


def test_an_empty_column_has_no_levels():
    counts = level_counts(pd.Series([None, None], dtype=object))
    assert len(counts) == 0 and counts.total == 0 and dict(counts) == {}
