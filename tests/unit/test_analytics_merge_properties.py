"""The merge law: however rows are split over nodes and in whatever order the partials arrive,
merging the nodes' partials gives what pandas computes on the pooled rows.

Counts (count, missing, histograms, value counts, crosstabs) must be exact. Floating results are
compared with ``math.isclose(ours, pandas, rel_tol=1e-9, abs_tol=floor)``. The floor is needed
where the exact value is near 0 relative to the data (a sum of values that cancel, the variance
of 1e6 + tiny noise): there a relative error is not defined by the data but by rounding.

* sum, mean: ``1e-12 x sum(|x|)`` and ``1e-12 x max|x|``: what any summation order may lose;
* var: ``16 eps x max|x| x (max - min)``: a partial carries each node's mean as a float, off
  by up to half an ulp of ``max|x|``, and that moves the pooled M2 by up to
  ``n x (max - min) x ulp / 2``; cov(x, y): the same with each column's magnitude times the
  other's spread. pandas' own one-pass (Welford) covariance, used when there are NaNs, has an
  error of this size too (e.g. 4e-7 relative for a column 1e6 + 1e-5 against one of spread 2.5,
  where ours is exact);
* std: ``sqrt`` of the var floor (``|sqrt(a) - sqrt(b)| <= sqrt(|a - b|)``); corr: 1e-9 plus
  the cov and var floors relative to ``sqrt(var_i var_j)``.

So data like ``1e6 + noise in [0, 1]`` is still held to ~1e-9 relative, while a column whose
spread is a few ulps of its magnitude is held to what float64 can say about it.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlab.analytics import (
    CategoricalPartial,
    QuantileSearch,
    categorical_partial,
    covariance_partial,
    crosstab_partial,
    merge_categorical,
    merge_covariance,
    merge_crosstab,
    merge_numeric,
    numeric_partial,
)

EPS = np.finfo(float).eps
SETTINGS = settings(max_examples=120, deadline=None)


@st.composite
def numbers(draw, n: int) -> list[float]:
    """n values of one kind: moderate, a large offset plus noise, tiny, or few distinct (ties)."""
    kind = draw(st.sampled_from(["moderate", "offset", "tiny", "ties"]))
    # magnitudes below 1e-30 become 0: pandas squares them into underflow (a NaN correlation)
    if kind == "moderate":
        elements = st.floats(-1e6, 1e6).map(lambda v: v if abs(v) > 1e-30 else 0.0)
    elif kind == "offset":
        offset = draw(st.sampled_from([1e6, -1e6, 1e4, 123.456]))
        elements = st.floats(0, 1).map(lambda e: offset + e)
    elif kind == "tiny":
        elements = st.floats(-1, 1).map(lambda v: v * 1e-6 if abs(v) > 1e-9 else 0.0)
    else:
        elements = st.sampled_from([-2.5, 0.0, 1.0, 3.0, 1e6])
    return draw(st.lists(elements, min_size=n, max_size=n))


@st.composite
def column(draw, n: int, missing: bool = True) -> list[float]:
    values = draw(numbers(n))
    if missing:
        holes = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        values = [math.nan if h else v for v, h in zip(values, holes, strict=True)]
    return values


@st.composite
def splits(draw, n: int) -> tuple[list[tuple[int, int]], list[str]]:
    """1 to 8 nodes holding consecutive row ranges (some empty), node ids in a random order."""
    k = draw(st.integers(1, 8))
    cuts = sorted(draw(st.lists(st.integers(0, n), min_size=k - 1, max_size=k - 1)))
    bounds = list(zip([0, *cuts], [*cuts, n], strict=True))
    ids = draw(st.permutations([f"node{i}" for i in range(k)]))
    return bounds, list(ids)


def by_node(frame, bounds, ids, partial):
    """``{node id: partial}`` inserted in a random order (the order must not matter)."""
    return {ids[i]: partial(frame.iloc[a:b]) for i, (a, b) in enumerate(bounds)}


def shuffled(parts: dict, order: list[int]) -> dict:
    """The same partials, inserted in another order."""
    items = list(parts.items())
    return dict(items[i] for i in order)


def close(ours: float, expected: float, floor: float, rel: float = 1e-9) -> bool:
    if math.isnan(expected) or math.isnan(ours):
        return math.isnan(expected) and math.isnan(ours)
    return math.isclose(ours, expected, rel_tol=rel, abs_tol=floor)


def cov_floor(x: np.ndarray, y: np.ndarray) -> float:
    """Rounding floor of cov(x, y): each mean is off by ~ulp(max|.|), times the other's spread,
    plus the product of the two mean errors (all that is left when a column is constant)."""
    if x.size == 0:
        return 0.0
    scale_x, scale_y = float(np.max(np.abs(x))), float(np.max(np.abs(y)))
    second_order = (16 * EPS) ** 2 * scale_x * scale_y
    return 16 * EPS * (scale_x * float(np.ptp(y)) + scale_y * float(np.ptp(x))) / 2 + second_order + 1e-290


def var_floor(x: np.ndarray) -> float:
    return cov_floor(x, x)


# -- numeric ---------------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data())
def test_numeric_merge_equals_pandas_on_pooled_rows(data):
    n = data.draw(st.integers(0, 60))
    series = pd.Series(data.draw(column(n)), dtype=float)
    bounds, ids = data.draw(splits(n))
    edges = sorted(set(data.draw(st.lists(st.floats(-2e6, 2e6, allow_subnormal=False), min_size=2, max_size=6))))
    edges = edges if len(edges) >= 2 else [-1.0, 1.0]
    parts = by_node(series, bounds, ids, lambda s: numeric_partial(s, with_min_max=True, histogram_edges=edges))
    merged = merge_numeric(parts)

    pooled = series.dropna().to_numpy()
    assert (merged.count, merged.missing) == (pooled.size, series.isna().sum())
    assert merged.histogram == np.histogram(pooled, bins=edges)[0].tolist() and merged.histogram_suppressed == {}
    scale = float(np.max(np.abs(pooled))) if pooled.size else 0.0
    assert close(merged.sum, series.sum(), 1e-12 * float(np.sum(np.abs(pooled))))
    assert close(merged.mean, series.mean(), 1e-12 * scale)
    assert close(merged.var, series.var(), var_floor(pooled))
    assert close(merged.std, series.std(), math.sqrt(var_floor(pooled)))
    assert merged.min == (series.min() if pooled.size else None)
    assert merged.max == (series.max() if pooled.size else None)

    order = data.draw(st.permutations(range(len(parts))))
    again = merge_numeric(shuffled(parts, list(order)))
    assert repr(again) == repr(merged)  # bit for bit, not just close


# -- categorical and crosstab ----------------------------------------------------------------------

LABELS = st.sampled_from(["a", "b", "c", 1, 2.0, -0.0, True, None, math.nan])


@SETTINGS
@given(data=st.data(), dropna=st.booleans())
def test_value_counts_merge_exactly(data, dropna):
    rows = data.draw(st.lists(LABELS, max_size=60))
    series = pd.Series(rows, dtype=object)
    bounds, ids = data.draw(splits(len(rows)))
    parts = by_node(series, bounds, ids, lambda s: categorical_partial(s, dropna=dropna))
    merged = merge_categorical(shuffled(parts, list(data.draw(st.permutations(range(len(parts)))))))

    present = [str(v) for v in rows if not pd.isna(v)]
    expected = Counter(present)
    if not dropna and series.isna().any():
        expected["<missing>"] = int(series.isna().sum())
    assert merged.value_counts == dict(expected) and merged.suppressed == {}
    assert (merged.count, merged.missing) == (len(present), int(series.isna().sum()))
    assert merged.to_series().to_dict() == dict(expected)
    assert merged.to_series().is_monotonic_decreasing
    assert merged.withheld_levels == {}


@SETTINGS
@given(data=st.data())
def test_value_counts_with_unnamed_withheld_levels_are_lower_bounds(data):
    """A node that withholds its rare levels names none of them (it only counts them): the merged
    count of each named level is the sum of the counts disclosed, a lower bound of the pooled count
    exactly where ``suppressed`` lists some node, and the result is independent of node order."""
    rows = data.draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=80))
    bounds, ids = data.draw(splits(len(rows)))
    threshold = data.draw(st.integers(1, 4))
    parts = {}
    for (lo, hi), node in zip(bounds, ids, strict=True):
        counts = Counter(rows[lo:hi])
        shown = {k: n for k, n in counts.items() if n >= threshold}
        parts[node] = CategoricalPartial(count=hi - lo, missing=0, value_counts=shown,
                                         suppressed_levels=len(counts) - len(shown))
    merged = merge_categorical(shuffled(parts, list(data.draw(st.permutations(range(len(parts)))))))
    assert merged == merge_categorical(parts)
    pooled = Counter(rows)
    for level, n in merged.value_counts.items():
        assert n <= pooled[level]
        if n < pooled[level]:
            assert merged.suppressed.get(level)
        for node in merged.suppressed.get(level, []):
            assert parts[node].suppressed_levels > 0 and level not in parts[node].value_counts
    assert merged.withheld_levels == {n: p.suppressed_levels for n, p in parts.items() if p.suppressed_levels}


@SETTINGS
@given(data=st.data())
def test_crosstabs_merge_exactly(data):
    rows = data.draw(st.lists(st.tuples(LABELS, LABELS), max_size=60))
    frame = pd.DataFrame(rows, columns=["r", "c"], dtype=object)
    bounds, ids = data.draw(splits(len(rows)))
    parts = by_node(frame, bounds, ids, lambda f: crosstab_partial(f, "r", "c"))
    merged = merge_crosstab(shuffled(parts, list(data.draw(st.permutations(range(len(parts)))))))

    both = frame.dropna()
    expected = pd.crosstab(both["r"].map(str), both["c"].map(str)) if len(both) else pd.DataFrame()
    assert merged.table.to_dict() == expected.to_dict()
    assert merged.table.values.sum() == len(both) and merged.suppressed == {}


# -- covariance and correlation --------------------------------------------------------------------


@SETTINGS
@given(data=st.data())
def test_covariance_merge_equals_pandas_pairwise(data):
    n = data.draw(st.integers(0, 40))
    frame = pd.DataFrame({name: data.draw(column(n)) for name in ("x", "y", "z")}, dtype=float)
    bounds, ids = data.draw(splits(n))
    parts = by_node(frame, bounds, ids, lambda f: covariance_partial(f, ["x", "y", "z"]))
    cov, corr = merge_covariance(shuffled(parts, list(data.draw(st.permutations(range(len(parts)))))))
    with warnings.catch_warnings():  # numpy warns about pandas' own cov of 0 or 1 rows
        warnings.simplefilter("ignore", RuntimeWarning)
        expected_cov, expected_corr = frame.cov(), frame.corr()

    for i in "xyz":
        for j in "xyz":
            rows = frame[[i, j]].dropna()
            xi, xj = rows[i].to_numpy(), rows[j].to_numpy()
            floor = cov_floor(xi, xj)
            assert close(cov.loc[i, j], expected_cov.loc[i, j], floor), (i, j)
            if math.isnan(expected_corr.loc[i, j]) or math.isnan(corr.loc[i, j]):
                assert math.isnan(expected_corr.loc[i, j]) and math.isnan(corr.loc[i, j]), (i, j)
                continue
            vi, vj = float(np.var(xi, ddof=1)), float(np.var(xj, ddof=1))
            corr_floor = 1e-9 + 2 * (floor / math.sqrt(vi * vj) + var_floor(xi) / vi + var_floor(xj) / vj)
            assert close(corr.loc[i, j], expected_corr.loc[i, j], corr_floor), (i, j)
            assert cov.loc[i, j] == cov.loc[j, i] and corr.loc[i, j] == corr.loc[j, i]


# -- quantiles -------------------------------------------------------------------------------------

LEVELS = [0, 0.1, 0.25, 0.5, 0.9, 1]


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_federated_quantiles_equal_pandas_on_pooled_rows(data):
    n = data.draw(st.integers(1, 80))
    series = pd.Series(data.draw(column(n, missing=False)), dtype=float)
    series.iloc[data.draw(st.lists(st.integers(0, n - 1), max_size=n // 3))] = math.nan  # some holes
    if series.notna().sum() == 0:
        series.iloc[0] = 0.5
    bounds, ids = data.draw(splits(n))
    nodes = {ids[i]: series.iloc[a:b] for i, (a, b) in enumerate(bounds)}
    merged = merge_numeric({node: numeric_partial(s) for node, s in nodes.items()})
    search = QuantileSearch.from_moments(LEVELS, merged.count, merged.mean, merged.std)
    while (thresholds := search.next_thresholds()) is not None:
        replies = {node: numeric_partial(s, thresholds=thresholds) for node, s in nodes.items()}
        below = merge_numeric(replies).below
        assert below is not None
        search.update(below)
    assert search.rounds <= 14
    result = search.result()

    pooled = series.dropna()
    expected = pooled.quantile(LEVELS)
    # 1e-6 of the range, and a few ulps: pandas' interpolation rounds too
    tolerance = 1e-6 * (pooled.max() - pooled.min()) + 4 * EPS * pooled.abs().max()
    for q in LEVELS:
        assert abs(result[q] - expected[q]) <= tolerance, (q, result[q], expected[q])
    if pooled.nunique() == 1:
        assert set(result.values()) == {pooled.iloc[0]} and search.rounds == 1
