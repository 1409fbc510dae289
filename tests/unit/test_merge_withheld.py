"""Merging what hardened nodes send: counts below thresholds with withheld (None) entries, value
counts whose suppressed levels are not named (only counted), histogram bins next to a withheld edge."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pandas as pd
import pytest

from fedlab.analytics.merge import MergedCategorical, merge_categorical, merge_numeric
from fedlab.analytics.messages import CategoricalPartial, FAReply, NumericPartial
from fedlab.analytics.partials import MISSING_KEY, categorical_partial, numeric_partial
from fedlab.errors import FedlabProtocolError
from fedlab.preprocessing.fit import impute_params, onehot_params
from fedlab.researcher.fa_result import FAResult


def numeric(count: int, below: list[int | None] | None = None, **kwargs) -> NumericPartial:
    return NumericPartial(count=count, missing=0, sum=0.0, mean=0.0, m2=0.0, below=below, **kwargs)


# -- counts below thresholds ------------------------------------------------------------------------


def test_below_sums_per_threshold_and_is_none_where_any_node_withheld():
    merged = merge_numeric({"a": numeric(30, [5, None, 20, None]), "b": numeric(20, [1, 7, None, None]),
                            "c": numeric(10, [0, 4, 9, 10])})
    assert merged.below == [6, None, None, None]
    assert merge_numeric({"a": numeric(30, [5, 25]), "b": numeric(20, [1, 7])}).below == [6, 32]


def test_below_is_the_same_in_any_node_order():
    parts = {"a": numeric(3, [None, 1]), "b": numeric(4, [2, 3]), "c": numeric(0)}
    assert merge_numeric(parts).below == merge_numeric(dict(reversed(parts.items()))).below == [None, 4]


def test_a_node_without_values_needs_no_counts_but_a_node_with_values_does():
    assert merge_numeric({"a": numeric(3, [None, 1]), "empty": numeric(0)}).below == [None, 1]
    with pytest.raises(FedlabProtocolError, match="node b sent no counts"):
        merge_numeric({"a": numeric(3, [None, 1]), "b": numeric(2)})
    with pytest.raises(FedlabProtocolError, match="different shapes"):
        merge_numeric({"a": numeric(3, [None, 1]), "b": numeric(2, [1])})


def test_resolution_does_not_disturb_the_moments():
    partial = numeric_partial(pd.Series([1.0, 2.0, 4.0, 8.0]))
    plain = merge_numeric({"a": partial})
    gridded = merge_numeric({"a": msgspec.structs.replace(partial, resolution=0.1)})
    assert (plain.count, plain.mean, plain.var) == (gridded.count, gridded.mean, gridded.var)


def test_bins_next_to_a_withheld_edge_count_as_suppressed():
    edges = [0.0, 10.0, 20.0, 30.0]
    a = numeric(12, histogram_edges=edges, histogram=[None, 8, None])
    b = numeric(9, histogram_edges=edges, histogram=[3, 4, 2])
    merged = merge_numeric({"a": a, "b": b})
    assert merged.histogram == [3, 12, 2] and merged.histogram_suppressed == {0: ["a"], 2: ["a"]}


# -- value counts with unnamed suppressed levels ----------------------------------------------------


def test_a_level_another_node_did_not_name_is_a_lower_bound_where_it_withheld_levels():
    a = CategoricalPartial(count=60, missing=0, value_counts={"x": 40, "y": 20})
    b = CategoricalPartial(count=35, missing=2, value_counts={"x": 33}, suppressed_levels=2)
    c = CategoricalPartial(count=10, missing=0, value_counts={"x": 6, "y": 4})
    merged = merge_categorical({"c": c, "b": b, "a": a})
    assert merged.value_counts == {"x": 79, "y": 24}
    assert merged.suppressed == {"y": ["b"]}  # b may hold y among the 2 levels it withheld
    assert merged.withheld_levels == {"b": 2}
    assert (merged.count, merged.missing) == (105, 2)
    assert merged.to_series().to_dict() == {"x": 79, "y": 24}


def test_levels_withheld_everywhere_are_only_counted():
    a = CategoricalPartial(count=50, missing=0, value_counts={"x": 48}, suppressed_levels=1)
    b = CategoricalPartial(count=50, missing=0, value_counts={"x": 49}, suppressed_levels=1)
    merged = merge_categorical({"a": a, "b": b})
    assert merged.value_counts == {"x": 97} and merged.suppressed == {} and merged.withheld_levels == {"a": 1, "b": 1}


def test_old_none_counts_and_unnamed_levels_together_in_any_order():
    a = CategoricalPartial(count=10, missing=0, value_counts={"x": 7, "z": None})  # an older node
    b = CategoricalPartial(count=12, missing=0, value_counts={"y": 9}, suppressed_levels=1)
    c = CategoricalPartial(count=5, missing=0, value_counts={"x": None, "y": 5})
    merged = merge_categorical({"a": a, "b": b, "c": c})
    assert merged.value_counts == {"x": 7, "y": 14}
    assert merged.suppressed == {"x": ["b", "c"], "z": ["a", "b"]}
    again = merge_categorical({"c": c, "a": a, "b": b})
    assert again == merged


def test_merged_categorical_keeps_its_old_constructor():
    m = MergedCategorical(count=1, missing=0, value_counts={"x": 1}, suppressed={})
    assert m.withheld_levels == {}


def test_missing_as_a_level_is_treated_like_any_other():
    a = CategoricalPartial(count=30, missing=20, value_counts={"x": 30, MISSING_KEY: 20})
    b = CategoricalPartial(count=30, missing=2, value_counts={"x": 28}, suppressed_levels=2)
    merged = merge_categorical({"a": a, "b": b})
    assert merged.suppressed == {MISSING_KEY: ["b"]} and merged.value_counts[MISSING_KEY] == 20


# -- what the fitted steps make of it ---------------------------------------------------------------


def test_onehot_always_keeps_an_other_column():
    frame = pd.DataFrame({"k": ["a", "b", "b", "c"]})
    assert onehot_params({"k": merge_categorical({"n1": categorical_partial(frame["k"])})})["other"] == {"k": True}
    withheld = merge_categorical({"n1": CategoricalPartial(count=40, missing=0, value_counts={"a": 37},
                                                           suppressed_levels=1)})
    spec = onehot_params({"k": withheld})
    assert spec["categories"] == {"k": ["a"]} and spec["other"] == {"k": True}


def test_most_frequent_ignores_unnamed_levels():
    a = CategoricalPartial(count=40, missing=0, value_counts={"2.0": 25, "3.0": 13}, suppressed_levels=1)
    b = CategoricalPartial(count=20, missing=0, value_counts={"3.0": 12}, suppressed_levels=2)
    merged = merge_categorical({"a": a, "b": b})
    assert merged.suppressed == {"2.0": ["b"]}
    assert impute_params("most_frequent", {}, {"v": merged}, None)["values"] == {"v": 2.0}


# -- what the result shows --------------------------------------------------------------------------


def result_with(categorical: dict[str, CategoricalPartial], allowance: dict[str, dict[str, int]]) -> FAResult:
    replies = {n: FAReply(dataset_id="d", n_rows=p.count + p.missing, categorical={"site": p},
                          allowance=allowance.get(n, {})) for n, p in categorical.items()}
    result = FAResult(stats=["value_counts"], quantile_levels=[0.5], node_names={"a": "A", "b": "B"},
                      replies=replies)
    result.categorical["site"] = merge_categorical(categorical)
    result.contributors["site"] = list(categorical)
    result.allowances = {n: dict(v) for n, v in allowance.items()}
    return result


def test_value_counts_and_notes_say_which_node_withheld_how_many_levels():
    result = result_with({"a": CategoricalPartial(count=50, missing=0, value_counts={"north": 30, "south": 20}),
                          "b": CategoricalPartial(count=41, missing=0, value_counts={"north": 40},
                                                  suppressed_levels=1)},
                         {"a": {"age": 480}, "b": {"age": 0}})
    frame = result.value_counts("site")
    assert frame["value"].tolist() == ["north", "south"] and frame["count"].tolist() == [70, 20]
    assert frame["suppressed_on"].tolist() == ["", "B"] and frame.attrs["withheld_levels"] == {"B": 1}
    levels = result.withheld_levels()
    assert levels.loc["A", "site"] == 0 and levels.loc["B", "site"] == 1
    notes = result.notes()
    assert any(line.startswith("B withheld 1 level of 'site'") for line in notes)
    assert any("B has no threshold allowance left on 'age'" in line for line in notes)
    allowance = result.allowance()
    assert allowance.loc["A", "age"] == 480 and allowance.loc["B", "age"] == 0


def test_quantile_bounds_frame_and_approximate_notes():
    result = FAResult(stats=["quantiles"], quantile_levels=[0.1, 0.5], node_names={}, replies={})
    result.quantiles = {"x": {0.1: math.nan, 0.5: 4.25}, "y": {0.1: 1.0, 0.5: 2.0}}
    result.quantile_errors = {"x": {0.1: math.inf, 0.5: 0.25}, "y": {0.1: 0.0, 0.5: 0.005}}
    result.quantile_approximate = {"x": [0.1, 0.5], "y": []}
    result.quantile_nodes = {"x": ["a", "b"], "y": ["a"]}
    result.resolutions = {"x": 0.01}
    frame = result.quantile_bounds()
    assert frame.loc[("x", 0.5), "low"] == 4.0 and frame.loc[("x", 0.5), "high"] == 4.5
    assert frame.loc[("x", 0.1), "approximate"] and not frame.loc[("y", 0.5), "approximate"]
    assert frame.loc[("x", 0.5), "nodes"] == 2 and frame.loc[("x", 0.5), "resolution"] == 0.01
    assert np.isnan(frame.loc[("y", 0.5), "resolution"])
    (line,) = [n for n in result.notes() if "approximate" in n]
    assert "q0.1 unknown" in line and "q0.5 = 4.25 ± 0.25" in line
    assert "<li>quantiles of &#x27;x&#x27; are approximate" in result._repr_html_()
