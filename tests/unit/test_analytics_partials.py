"""What one node computes from its own rows: exact partials, their edge cases and their errors."""

from __future__ import annotations

import decimal
import math

import msgspec
import numpy as np
import pandas as pd
import pytest

from fedlab.analytics import (
    CategoricalPartial,
    CovariancePartial,
    CrosstabPartial,
    NumericPartial,
    QuantileSearch,
    categorical_partial,
    covariance_partial,
    crosstab_partial,
    is_numeric,
    merge_categorical,
    merge_covariance,
    merge_crosstab,
    merge_moments,
    merge_numeric,
    numeric_partial,
)
from fedlab.errors import FedlabConfigError, FedlabDatasetError, FedlabProtocolError

# -- is_numeric ----------------------------------------------------------------------------------


@pytest.mark.parametrize("series", [
    pd.Series([1, 2, 3]),
    pd.Series([1.5, np.nan]),
    pd.Series([True, False]),
    pd.Series([1, None], dtype="Int64"),
    pd.Series([True, None], dtype="boolean"),
    pd.Series([1, 2.5, None], dtype=object),
    pd.Series([decimal.Decimal("1.5")], dtype=object),
    pd.Series([None, None], dtype=object),
])
def test_numeric_columns(series):
    assert is_numeric(series)


@pytest.mark.parametrize("series", [
    pd.Series(["a", "b"]),
    pd.Series(["1", "2"], dtype=object),
    pd.Series([1, "a"], dtype=object),
    pd.Series(pd.to_datetime(["2020-01-01"])),
    pd.Series([1 + 2j]),
    pd.Series([1, 2], dtype="category"),
])
def test_non_numeric_columns(series):
    assert not is_numeric(series)


# -- numeric_partial -----------------------------------------------------------------------------


def test_moments_skip_missing_values():
    p = numeric_partial(pd.Series([1.0, None, 2.0, np.nan, 6.0]))
    assert (p.count, p.missing, p.sum, p.mean) == (3, 2, 9.0, 3.0)
    assert p.m2 == pytest.approx(14.0)  # (1-3)^2 + (2-3)^2 + (6-3)^2
    assert p.min is None and p.max is None and p.histogram is None and p.below is None


def test_nullable_and_bool_columns():
    p = numeric_partial(pd.Series([1, None, 3], dtype="Int64"))
    assert (p.count, p.missing, p.mean) == (2, 1, 2.0)
    b = numeric_partial(pd.Series([True, False, True, None], dtype="boolean"))
    assert (b.count, b.missing, b.sum) == (3, 1, 2.0)


def test_empty_and_all_missing_columns():
    for series in (pd.Series([], dtype=float), pd.Series([np.nan, np.nan]), pd.Series([None], dtype=object)):
        p = numeric_partial(series, with_min_max=True, histogram_edges=[0, 1], thresholds=[0.5])
        assert (p.count, p.sum, p.mean, p.m2) == (0, 0.0, 0.0, 0.0)
        assert p.missing == len(series)
        assert (p.min, p.max, p.histogram, p.below) == (None, None, [0], [0])


def test_constant_column_has_exact_mean_and_zero_m2():
    p = numeric_partial(pd.Series([0.1] * 7))
    assert p.mean == 0.1 and p.m2 == 0.0  # naive sum / n would give 0.09999999999999999
    assert pd.Series([0.1] * 7).var() != 0.0  # pandas leaves rounding noise


def test_moments_are_stable_for_a_large_offset():
    rng = np.random.default_rng(3)
    x = 1e9 + rng.uniform(0, 1, 1000)
    p = numeric_partial(pd.Series(x))
    exact = float(sum((decimal.Decimal(v) - sum(map(decimal.Decimal, x)) / len(x)) ** 2 for v in x))
    assert math.isclose(p.m2, exact, rel_tol=1e-12)


def test_min_max_only_when_asked():
    p = numeric_partial(pd.Series([3.0, -1.0, 2.0]), with_min_max=True)
    assert (p.min, p.max) == (-1.0, 3.0)


def test_histogram_has_numpy_semantics():
    x = pd.Series([-5.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 7.0, np.nan])
    p = numeric_partial(x, histogram_edges=[0, 1, 2])
    assert p.histogram == [2, 4]  # [0, 1) holds 0, 0.5; [1, 2] holds 1, 1.5, 2, 2; -5 and 7 are outside
    assert p.histogram_edges == [0.0, 1.0, 2.0]
    assert p.histogram == np.histogram(x.dropna(), bins=[0, 1, 2])[0].tolist()


@pytest.mark.parametrize(("edges", "message"), [
    ([1.0], "at least 2"),
    ([], "at least 2"),
    ([0, 1, 1], "strictly increasing"),
    ([2, 1], "strictly increasing"),
    ([0, math.inf], "finite"),
    ([0, math.nan], "finite"),
    (["a", "b"], "numbers"),
])
def test_bad_histogram_edges_are_refused(edges, message):
    with pytest.raises(FedlabConfigError, match=message):
        numeric_partial(pd.Series([1.0]), histogram_edges=edges)


def test_counts_below_thresholds():
    p = numeric_partial(pd.Series([3.0, 1.0, 2.0, 2.0, None]), thresholds=[2.0, 0.0, 1.5, 10.0, -math.inf, math.inf])
    assert p.below == [3, 0, 1, 4, 0, 4]


def test_nan_threshold_is_refused():
    with pytest.raises(FedlabConfigError, match="NaN"):
        numeric_partial(pd.Series([1.0]), thresholds=[math.nan])


def test_non_numeric_column_is_refused():
    with pytest.raises(FedlabDatasetError, match="'name' is not numeric"):
        numeric_partial(pd.Series(["a", "b"], name="name"))


def test_partials_survive_the_wire():
    p = numeric_partial(pd.Series([1.0, 2.0]), with_min_max=True, histogram_edges=[0, 5], thresholds=[1.5])
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=NumericPartial) == p


# -- categorical_partial -------------------------------------------------------------------------


def test_value_counts_are_keyed_by_str():
    p = categorical_partial(pd.Series([1.0, 2.0, 1.0, np.nan, -0.0, 0.0]))
    assert p == CategoricalPartial(count=5, missing=1, value_counts={"1.0": 2, "2.0": 1, "-0.0": 1, "0.0": 1})


def test_missing_values_counted_when_asked():
    s = pd.Series(["a", None, "b", "a", np.nan], dtype=object)
    assert categorical_partial(s).value_counts == {"a": 2, "b": 1}
    assert categorical_partial(s, dropna=False).value_counts == {"a": 2, "b": 1, "<missing>": 2}
    assert categorical_partial(pd.Series(["a"]), dropna=False).value_counts == {"a": 1}


def test_value_counts_of_other_dtypes():
    assert categorical_partial(pd.Series([1, 2, 2])).value_counts == {"1": 1, "2": 2}
    assert categorical_partial(pd.Series([True, False, True])).value_counts == {"True": 2, "False": 1}
    cat = pd.Series(["x", "y", "x"], dtype=pd.CategoricalDtype(["x", "y", "z"]))
    assert categorical_partial(cat).value_counts == {"x": 2, "y": 1}  # unused categories are not cells
    mixed = pd.Series([1, 1.0, True, "1"], dtype=object)
    assert categorical_partial(mixed).value_counts == {"1": 2, "1.0": 1, "True": 1}
    assert categorical_partial(pd.Series([], dtype=object)) == CategoricalPartial(0, 0, {})


# -- crosstab_partial ----------------------------------------------------------------------------


def test_crosstab_counts_rows_where_both_are_present():
    frame = pd.DataFrame({"sex": ["F", "M", "F", None, "F"], "smoker": [1.0, 0.0, 1.0, 1.0, np.nan]})
    p = crosstab_partial(frame, "sex", "smoker")
    assert p == CrosstabPartial(rows="sex", cols="smoker", cells={"F": {"1.0": 2}, "M": {"0.0": 1}})


def test_crosstab_needs_both_columns():
    with pytest.raises(FedlabDatasetError, match="no column 'nope'"):
        crosstab_partial(pd.DataFrame({"a": [1]}), "a", "nope")


# -- covariance_partial --------------------------------------------------------------------------


def test_covariance_partial_is_pairwise_complete():
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0, np.nan], "y": [2.0, np.nan, 6.0, 8.0]})
    p = covariance_partial(frame, ["x", "y"])
    assert p.columns == ["x", "y"]
    assert p.n == [[3, 2], [2, 3]]
    assert p.mean_x[0][1] == 2.0 and p.mean_y[0][1] == 4.0  # rows 0 and 2
    assert p.mean_x[1][0] == 4.0 and p.mean_y[1][0] == 2.0  # transposed view
    assert p.m2_x[0][1] == 2.0 and p.m2_y[0][1] == 8.0 and p.c[0][1] == 4.0 == p.c[1][0]
    assert p.c[0][0] == p.m2_x[0][0] == 2.0 and p.c[1][1] == pytest.approx(18.6666666666)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=CovariancePartial) == p


def test_covariance_needs_numeric_columns():
    with pytest.raises(FedlabDatasetError, match="'s' is not numeric"):
        covariance_partial(pd.DataFrame({"x": [1.0], "s": ["a"]}), ["x", "s"])
    with pytest.raises(FedlabDatasetError, match="no column"):
        covariance_partial(pd.DataFrame({"x": [1.0]}), ["x", "z"])


# -- merging: the cases the property tests do not reach -------------------------------------------


def test_merge_moments_ignores_empty_parts():
    n, mean, m2 = merge_moments([])
    assert n == 0 and math.isnan(mean) and m2 == 0.0
    assert merge_moments([(0, 0.0, 0.0), (2, 1.5, 0.5)]) == (2, 1.5, 0.5)
    assert merge_moments([(2, 1.0, 0.0), (3, 1.0, 0.0)]) == (5, 1.0, 0.0)


def test_merged_numeric_reports_suppression_and_min_max():
    a = NumericPartial(count=2, missing=0, sum=3.0, mean=1.5, m2=0.5, min=1.0, max=2.0,
                       histogram_edges=[0.0, 1.0, 2.0], histogram=[None, 2])
    b = NumericPartial(count=1, missing=4, sum=5.0, mean=5.0, m2=0.0, min=5.0, max=5.0,
                       histogram_edges=[0.0, 1.0, 2.0], histogram=[0, None])
    c = NumericPartial(count=0, missing=1, sum=0.0, mean=0.0, m2=0.0)  # no values: needs no min
    m = merge_numeric({"b": b, "a": a, "c": c})
    assert (m.count, m.missing, m.sum, m.min, m.max) == (3, 5, 8.0, 1.0, 5.0)
    assert m.histogram == [0, 2] and m.histogram_suppressed == {0: ["a"], 1: ["b"]}
    assert m.var == pytest.approx(pd.Series([1.0, 2.0, 5.0]).var())
    d = NumericPartial(count=1, missing=0, sum=1.0, mean=1.0, m2=0.0)  # values, but no histogram
    m2 = merge_numeric({"a": a, "d": d})
    assert m2.min is None and m2.max is None
    assert m2.histogram_suppressed == {0: ["a", "d"], 1: ["d"]}


def test_merged_numeric_of_nothing():
    m = merge_numeric({})
    assert m.count == 0 and math.isnan(m.mean) and math.isnan(m.var) and m.sum == 0.0
    one = merge_numeric({"a": numeric_partial(pd.Series([4.0]))})
    assert one.mean == 4.0 and math.isnan(one.var) and math.isnan(one.std)


def test_different_histogram_edges_are_an_error():
    a = numeric_partial(pd.Series([1.0]), histogram_edges=[0, 1, 2])
    b = numeric_partial(pd.Series([1.0]), histogram_edges=[0, 2])
    with pytest.raises(FedlabProtocolError, match="different shapes"):
        merge_numeric({"a": a, "b": b})


def test_threshold_counts_must_come_from_every_node_with_values():
    a = numeric_partial(pd.Series([1.0, 2.0]), thresholds=[1.5])
    empty = numeric_partial(pd.Series([], dtype=float))
    assert merge_numeric({"a": a, "e": empty}).below == [1]
    with pytest.raises(FedlabProtocolError, match="node b sent no counts"):
        merge_numeric({"a": a, "b": numeric_partial(pd.Series([1.0]))})


def test_merged_categorical_attributes_suppressed_values():
    a = CategoricalPartial(count=10, missing=1, value_counts={"x": 7, "y": None, "z": None})
    b = CategoricalPartial(count=5, missing=0, value_counts={"x": None, "y": 5})
    m = merge_categorical({"b": b, "a": a})
    assert (m.count, m.missing) == (15, 1)
    assert m.value_counts == {"x": 7, "y": 5} and m.suppressed == {"x": ["b"], "y": ["a"], "z": ["a"]}
    s = merge_categorical({"a": CategoricalPartial(4, 0, {"b": 2, "a": 2, "c": 1})}).to_series()
    assert s.index.tolist() == ["a", "b", "c"] and s.tolist() == [2, 2, 1] and s.name == "count"


def test_merged_crosstab_fills_absent_cells_with_zero():
    a = CrosstabPartial(rows="r", cols="c", cells={"x": {"1": 2, "2": None}})
    b = CrosstabPartial(rows="r", cols="c", cells={"y": {"2": 3}})
    m = merge_crosstab({"a": a, "b": b})
    assert m.table.to_dict() == {"1": {"x": 2, "y": 0}, "2": {"x": 0, "y": 3}}
    assert m.suppressed == {("x", "2"): ["a"]} and (m.rows, m.cols) == ("r", "c")
    with pytest.raises(FedlabProtocolError, match="different shapes"):
        merge_crosstab({"a": a, "b": CrosstabPartial(rows="r", cols="other", cells={})})
    with pytest.raises(FedlabProtocolError, match="no node"):
        merge_crosstab({})


def test_merged_covariance_with_too_few_rows_or_no_spread():
    frame = pd.DataFrame({"x": [1.0, 2.0, np.nan], "y": [3.0, 3.0, 1.0], "z": [np.nan, 1.0, 2.0]})
    cov, corr = merge_covariance({"a": covariance_partial(frame, ["x", "y", "z"])})
    pd.testing.assert_frame_equal(cov, frame.cov(), check_exact=False, rtol=1e-12)
    pd.testing.assert_frame_equal(corr, frame.corr(), check_exact=False, rtol=1e-12)
    assert math.isnan(corr.loc["x", "y"]) and math.isnan(cov.loc["x", "z"])  # y constant; one row
    with pytest.raises(FedlabProtocolError, match="different shapes"):
        merge_covariance({"a": covariance_partial(frame, ["x"]), "b": covariance_partial(frame, ["y"])})


# -- QuantileSearch: arguments and driving errors ---------------------------------------------------


def drive(search: QuantileSearch, values) -> dict[float, float]:
    ordered = np.sort(np.asarray(values, dtype=float))
    while (ts := search.next_thresholds()) is not None:
        assert ts == sorted(set(ts)) and search.next_thresholds() == ts  # asking again is harmless
        search.update(np.searchsorted(ordered, ts, side="right").tolist())
    return search.result()


def test_quantiles_of_one_value_and_of_a_constant_column_are_exact_in_one_round():
    for values in ([7.3], [0.1] * 9, [0.0] * 4):
        s = QuantileSearch.from_moments([0, 0.3, 1], len(values), float(np.mean(values)),
                                        float(np.std(values, ddof=1)) if len(values) > 1 else math.nan)
        assert drive(s, values) == dict.fromkeys([0, 0.3, 1], values[0]) and s.rounds == 1


def test_constant_column_in_a_wide_bracket_is_still_exact():
    s = QuantileSearch([0.5], 5, (-4.0, 4.0))
    assert drive(s, [0.0] * 5) == {0.5: 0.0} and s.rounds <= 16


def test_quantiles_outside_the_initial_bracket_are_found():
    values = [1e6, 2e6, 3e6, -5e5]
    s = QuantileSearch([0, 0.5, 1], 4, (0.0, 1.0), tol=1e-3)
    result = drive(s, values)
    expected = pd.Series(values).quantile([0, 0.5, 1])
    for q in (0, 0.5, 1):
        assert abs(result[q] - expected[q]) <= 1e-3


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"q": [1.5]}, FedlabConfigError),
    ({"q": []}, FedlabConfigError),
    ({"q": [math.nan]}, FedlabConfigError),
    ({"n": 0}, FedlabDatasetError),
    ({"bracket": (1.0, 0.0)}, FedlabConfigError),
    ({"bracket": (math.nan, 1.0)}, FedlabConfigError),
    ({"tol": 0.0}, FedlabConfigError),
    ({"points_per_round": 1}, FedlabConfigError),
])
def test_quantile_search_arguments_are_checked(kwargs, error):
    args = {"q": [0.5], "n": 3, "bracket": (0.0, 1.0)} | kwargs
    with pytest.raises(error):
        QuantileSearch(args.pop("q"), args.pop("n"), args.pop("bracket"), **args)


def test_quantile_search_refuses_out_of_order_calls_and_bad_counts():
    s = QuantileSearch([0.5], 3, (0.0, 1.0))
    with pytest.raises(FedlabProtocolError):
        s.update([1])
    with pytest.raises(FedlabProtocolError):
        s.result()
    ts = s.next_thresholds()
    assert ts is not None
    with pytest.raises(FedlabProtocolError, match="counts for"):
        s.update([0])
    with pytest.raises(FedlabProtocolError, match="within"):
        s.update([4] * len(ts))
    with pytest.raises(FedlabProtocolError, match="decrease"):
        s.update([3] + [0] * (len(ts) - 1))
    s.update([0] * len(ts))  # the refused answers left no trace
    assert s.rounds == 1

