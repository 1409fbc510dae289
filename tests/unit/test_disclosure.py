"""The node operator's disclosure rules: every rule, the refusal messages, and rule validation."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import msgspec
import numpy as np
import pytest

from fedlab.analytics.disclosure import (
    COVARIANCE_KEY,
    CROSSTAB_KEY,
    RULE_HELP,
    DisclosureRules,
    apply_rules,
    check_enabled,
    describe,
)
from fedlab.analytics.messages import (
    CategoricalPartial,
    CovariancePartial,
    CrosstabPartial,
    FAReply,
    NumericPartial,
)
from fedlab.errors import FedlabConfigError, FedlabDisclosureError

RULES = DisclosureRules()


def num(count: int = 50, **kw: Any) -> NumericPartial:
    values: dict[str, Any] = {"missing": 0, "sum": 10.0 * count, "mean": 10.0, "m2": 4.0 * count, **kw}
    return NumericPartial(count=count, **values)


def cat(value_counts: dict[str, int | None], missing: int = 0) -> CategoricalPartial:
    count = sum(v or 0 for k, v in value_counts.items() if k != "<missing>")
    return CategoricalPartial(count=count, missing=missing, value_counts=value_counts)


def reply(**kw: Any) -> FAReply:
    return FAReply(dataset_id="ds", n_rows=100, **kw)


def apply(r: FAReply, rules: DisclosureRules = RULES, *, seed: int = 0, **kw: Any) -> FAReply:
    return apply_rules(r, rules, rng=np.random.default_rng(seed), **kw)


def cov(columns: list[str], n: list[list[int]]) -> CovariancePartial:
    zeros = [[0.0] * len(columns) for _ in columns]
    return CovariancePartial(columns=columns, n=n, mean_x=zeros, mean_y=zeros, m2_x=zeros, m2_y=zeros, c=zeros)


# --- defaults and validation ------------------------------------------------------------------


def test_defaults() -> None:
    assert RULES == DisclosureRules(
        enabled=True,
        min_count=10,
        cell_threshold=3,
        max_bins_fraction=0.1,
        min_max="off",
        min_max_noise=0.05,
        excluded_columns=(),
    )
    assert list(RULE_HELP) == [f.name for f in dataclasses.fields(DisclosureRules)]


def test_from_mapping_applies_defaults_and_values() -> None:
    assert DisclosureRules.from_mapping({}) == RULES
    rules = DisclosureRules.from_mapping(
        {"min_count": 5, "max_bins_fraction": 1, "min_max": "noisy", "excluded_columns": ["id", "notes"]}
    )
    assert rules.min_count == 5
    assert rules.max_bins_fraction == 1.0 and isinstance(rules.max_bins_fraction, float)
    assert rules.min_max == "noisy"
    assert rules.excluded_columns == ("id", "notes")
    same = DisclosureRules(min_count=5, max_bins_fraction=1, min_max="noisy", excluded_columns=["id", "notes"])  # type: ignore[arg-type]
    assert rules == same and hash(rules) == hash(same)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("enabled", 1, "true or false"),
        ("enabled", "yes", "true or false"),
        ("min_count", 0, "an integer >= 1"),
        ("min_count", -3, "an integer >= 1"),
        ("min_count", 2.5, "an integer >= 1"),
        ("min_count", True, "an integer >= 1"),
        ("min_count", "10", "an integer >= 1"),
        ("cell_threshold", 0, "an integer >= 1"),
        ("cell_threshold", 1.0, "an integer >= 1"),
        ("max_bins_fraction", 0, "a number > 0 and <= 1"),
        ("max_bins_fraction", 0.0, "a number > 0 and <= 1"),
        ("max_bins_fraction", 1.5, "a number > 0 and <= 1"),
        ("max_bins_fraction", math.nan, "a number > 0 and <= 1"),
        ("max_bins_fraction", True, "a number > 0 and <= 1"),
        ("max_bins_fraction", "0.1", "a number > 0 and <= 1"),
        ("min_max", "on", 'one of "off", "noisy", "exact"'),
        ("min_max", "OFF", 'one of "off", "noisy", "exact"'),
        ("min_max", False, 'one of "off", "noisy", "exact"'),
        ("min_max_noise", 0, "a finite number > 0"),
        ("min_max_noise", -0.1, "a finite number > 0"),
        ("min_max_noise", math.inf, "a finite number > 0"),
        ("min_max_noise", math.nan, "a finite number > 0"),
        ("min_max_noise", "0.05", "a finite number > 0"),
        ("excluded_columns", "patient_id", "a list of non-empty column names"),
        ("excluded_columns", ["id", 3], "a list of non-empty column names"),
        ("excluded_columns", [""], "a list of non-empty column names"),
        ("excluded_columns", 5, "a list of non-empty column names"),
    ],
)
def test_bad_values_name_the_key(key: str, value: object, expected: str) -> None:
    with pytest.raises(FedlabConfigError, match=rf"disclosure\.{key} must be {expected}"):
        DisclosureRules.from_mapping({key: value})
    with pytest.raises(FedlabConfigError, match=rf"disclosure\.{key} must be"):
        DisclosureRules(**{key: value})


def test_unknown_keys_are_refused_and_named() -> None:
    with pytest.raises(FedlabConfigError, match="unknown key.*min_cell, zzz.*allowed keys are enabled, min_count"):
        DisclosureRules.from_mapping({"zzz": 1, "min_cell": 3})


def test_from_mapping_refuses_a_non_table() -> None:
    with pytest.raises(FedlabConfigError, match="disclosure must be a table"):
        DisclosureRules.from_mapping([("min_count", 3)])  # type: ignore[arg-type]


def test_rules_are_frozen() -> None:
    with pytest.raises(AttributeError):
        RULES.min_count = 1  # type: ignore[misc]


def test_describe_lists_every_rule_with_its_value() -> None:
    text = describe(DisclosureRules(min_count=7, min_max="noisy", excluded_columns=("id",)))
    lines = text.splitlines()
    assert len(lines) == 1 + len(RULE_HELP)
    assert "min_count = 7:" in text
    assert 'min_max = "noisy":' in text
    assert 'excluded_columns = ["id"]:' in text
    assert "unused" not in text
    assert "(unused: min_max is not noisy)" in describe(RULES)
    assert "enabled = false" in describe(DisclosureRules(enabled=False))


# --- enabled ----------------------------------------------------------------------------------


def test_check_enabled() -> None:
    check_enabled(RULES)
    off = DisclosureRules(enabled=False)
    with pytest.raises(FedlabDisclosureError, match=r"switched off on this node \(rule disclosure\.enabled = false\)"):
        check_enabled(off)
    with pytest.raises(FedlabDisclosureError, match="switched off"):
        apply(reply(numeric={"age": num()}), off)


# --- excluded columns and min_count -----------------------------------------------------------


def test_passing_reply_is_unchanged_apart_from_rules() -> None:
    r = reply(numeric={"age": num(50)}, categorical={"sex": cat({"F": 20, "M": 30})}, refused={"x": "not found"})
    out = apply(r)
    assert out == r
    assert out is not r


def test_excluded_columns_are_removed_and_refused() -> None:
    rules = DisclosureRules(excluded_columns=("patient_id", "notes"))
    r = reply(numeric={"patient_id": num(), "age": num()}, categorical={"notes": cat({"a": 50})})
    out = apply(r, rules)
    assert list(out.numeric) == ["age"]
    assert out.categorical == {}
    for column in ("patient_id", "notes"):
        assert out.refused[column] == "excluded by the node's operator (disclosure.excluded_columns)"


def test_min_count_refuses_small_columns_with_rule_and_threshold() -> None:
    r = reply(
        numeric={"age": num(4), "bmi": num(10)},
        categorical={"sex": cat({"F": 5, "M": 4}), "site": cat({"a": 6, "b": 6})},
    )
    out = apply(r)
    assert list(out.numeric) == ["bmi"]
    assert list(out.categorical) == ["site"]
    assert out.refused["age"] == (
        "min_count: 4 non-missing values, fewer than this node's minimum of 10 (disclosure.min_count)"
    )
    assert out.refused["sex"] == (
        "min_count: 9 non-missing values, fewer than this node's minimum of 10 (disclosure.min_count)"
    )
    assert "minimum of 3 " in apply(reply(numeric={"age": num(2)}), DisclosureRules(min_count=3)).refused["age"]
    assert apply(r, DisclosureRules(min_count=4)).numeric.keys() == {"age", "bmi"}


def test_existing_refusals_are_kept() -> None:
    out = apply(reply(numeric={"age": num(3)}, refused={"weight": "no such column"}))
    assert out.refused == {
        "weight": "no such column",
        "age": "min_count: 3 non-missing values, fewer than this node's minimum of 10 (disclosure.min_count)",
    }


def test_input_reply_is_not_modified() -> None:
    r = reply(numeric={"age": num(50, histogram_edges=[0.0, 1.0, 2.0], histogram=[1, 49])}, refused={})
    before = msgspec.json.encode(r)
    apply(r)
    assert msgspec.json.encode(r) == before


# --- cell suppression -------------------------------------------------------------------------


def test_histogram_cells_below_threshold_are_none_and_zero_stays_zero() -> None:
    edges = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    out = apply(reply(numeric={"x": num(50, histogram_edges=edges, histogram=[20, 1, 0, 2, 27])}))
    part = out.numeric["x"]
    assert part.histogram == [20, None, 0, None, 27]
    assert part.histogram_edges == edges
    assert len(part.histogram) == 5  # never dropped
    assert part.histogram[2] == 0 and part.histogram[2] is not None


def test_cell_at_threshold_is_kept() -> None:
    out = apply(reply(numeric={"x": num(50, histogram_edges=[0.0, 1.0, 2.0], histogram=[3, 47])}))
    assert out.numeric["x"].histogram == [3, 47]
    out = apply(reply(numeric={"x": num(50, histogram_edges=[0.0, 1.0, 2.0], histogram=[3, 47])}),
                DisclosureRules(cell_threshold=4))
    assert out.numeric["x"].histogram == [None, None]


def test_single_suppressed_histogram_bin_gets_a_secondary_suppression() -> None:
    # 50 = 30 + 2 + 0 + 18: the 2 alone could be recovered from the count, so 18 goes too.
    out = apply(reply(numeric={"x": num(50, histogram_edges=[0.0, 1, 2, 3, 4], histogram=[30, 2, 0, 18])}))
    assert out.numeric["x"].histogram == [30, None, 0, None]


def test_threshold_one_suppresses_nothing() -> None:
    rules = DisclosureRules(cell_threshold=1)
    out = apply(reply(numeric={"x": num(50, histogram_edges=[0.0, 1, 2, 3], histogram=[1, 0, 49])}), rules)
    assert out.numeric["x"].histogram == [1, 0, 49]


def test_value_counts_suppression_never_names_a_suppressed_level() -> None:
    out = apply(reply(categorical={"c": cat({"a": 20, "b": 1, "c": 2, "d": 0, "e": 17})}))
    assert out.categorical["c"].value_counts == {"a": 20, "d": 0, "e": 17}
    assert out.categorical["c"].suppressed_levels == 2
    out = apply(reply(categorical={"c": cat({"a": 20, "b": 1, "d": 0, "e": 17})}))
    assert out.categorical["c"].value_counts == {"a": 20, "d": 0}  # e: secondary, the smallest other
    assert out.categorical["c"].suppressed_levels == 2


def test_missing_value_count_is_not_a_level() -> None:
    # "<missing>" is released exactly in `missing`: neither suppressed nor able to hide another cell.
    part = cat({"a": 20, "b": 30, "<missing>": 2}, missing=2)
    out = apply(reply(categorical={"c": part}))
    assert out.categorical["c"].value_counts == {"a": 20, "b": 30, "<missing>": 2}
    assert out.categorical["c"].missing == 2 and out.categorical["c"].suppressed_levels == 0


def test_crosstab_cells_and_secondary_suppression() -> None:
    cells = {"F": {"yes": 10, "no": 1, "maybe": 0}, "M": {"yes": 12, "no": 8, "maybe": 0}}
    out = apply(reply(crosstab=CrosstabPartial(rows="sex", cols="smoker", cells=cells)))
    assert out.crosstab is not None
    got = out.crosstab.cells
    assert got["F"]["no"] is None
    assert got["F"]["maybe"] == 0 and got["M"]["maybe"] == 0
    # No row and no column is left with exactly one suppressed cell.
    rows = [list(r.values()) for r in got.values()]
    cols = [[got[r][c] for r in got] for c in got["F"]]
    for group in rows + cols:
        assert sum(v is None for v in group) != 1
    assert got == {"F": {"yes": None, "no": None, "maybe": 0}, "M": {"yes": None, "no": None, "maybe": 0}}
    assert out.crosstab.rows == "sex" and out.crosstab.cols == "smoker"


def test_crosstab_below_min_count_is_refused() -> None:
    cells = {"F": {"yes": 3, "no": 3}, "M": {"yes": 2, "no": 1}}
    out = apply(reply(crosstab=CrosstabPartial(rows="sex", cols="smoker", cells=cells)))
    assert out.crosstab is None
    assert out.refused[CROSSTAB_KEY] == (
        "min_count: crosstab total of 9, fewer than this node's minimum of 10 (disclosure.min_count)"
    )


def test_crosstab_of_an_excluded_column_is_refused() -> None:
    cells = {"a": {"x": 50}}
    out = apply(reply(crosstab=CrosstabPartial(rows="id", cols="sex", cells=cells)),
                DisclosureRules(excluded_columns=("id",)))
    assert out.crosstab is None
    assert out.refused[CROSSTAB_KEY] == "excluded by the node's operator (disclosure.excluded_columns): id"


# --- max_bins_fraction ------------------------------------------------------------------------


def test_too_many_bins_drops_only_the_histogram() -> None:
    edges = [float(i) for i in range(21)]
    part = num(50, histogram_edges=edges, histogram=[2] * 20, min=1.0, max=2.0)
    out = apply(reply(numeric={"x": part}), DisclosureRules(min_max="exact"))
    kept = out.numeric["x"]
    assert kept.histogram is None and kept.histogram_edges is None
    assert kept.count == 50 and kept.mean == 10.0 and kept.min == 1.0
    assert "x" not in out.refused
    assert out.refused["x.histogram"] == (
        "max_bins_fraction: 20 bins for 50 values exceeds this node's maximum of 5 bins "
        "(disclosure.max_bins_fraction = 0.1)"
    )


@pytest.mark.parametrize(
    ("fraction", "count", "allowed"),
    [(0.1, 50, 5), (0.1, 10, 1), (0.1, 19, 1), (0.1, 20, 2), (0.29, 100, 29), (1.0, 12, 12), (0.01, 10, 1)],
)
def test_bin_limit(fraction: float, count: int, allowed: int) -> None:
    rules = DisclosureRules(max_bins_fraction=fraction, cell_threshold=1)
    for bins, ok in ((allowed, True), (allowed + 1, False)):
        hist = [count // bins] * bins
        hist[0] += count - sum(hist)
        part = num(count, histogram_edges=[float(i) for i in range(bins + 1)], histogram=hist)
        out = apply(reply(numeric={"x": part}), rules)
        assert (out.numeric["x"].histogram == hist) is ok
        assert ("x.histogram" in out.refused) is not ok


# --- min / max --------------------------------------------------------------------------------


def test_min_max_off_removes_them_and_refuses_when_asked() -> None:
    r = reply(numeric={"a": num(min=1.0, max=9.0), "b": num(min=2.0, max=3.0), "c": num()})
    out = apply(r, asked_min_max=["a", "c"])
    for column in "abc":
        assert out.numeric[column].min is None and out.numeric[column].max is None
    assert out.refused == {
        "a.min/max": 'min_max: this node does not release minimum and maximum values (disclosure.min_max = "off")',
        "c.min/max": 'min_max: this node does not release minimum and maximum values (disclosure.min_max = "off")',
    }


def test_min_max_refusal_not_recorded_for_refused_columns() -> None:
    out = apply(reply(numeric={"a": num(3, min=1.0, max=2.0)}), asked_min_max=["a"])
    assert set(out.refused) == {"a"}


def test_min_max_exact_keeps_them() -> None:
    out = apply(reply(numeric={"a": num(min=1.5, max=9.25)}), DisclosureRules(min_max="exact"), asked_min_max=["a"])
    assert (out.numeric["a"].min, out.numeric["a"].max) == (1.5, 9.25)
    assert out.refused == {}


@pytest.mark.parametrize("seed", range(20))
def test_min_max_noisy_is_strictly_outside_and_within_bound(seed: int) -> None:
    rules = DisclosureRules(min_max="noisy", min_max_noise=0.05)
    out = apply(reply(numeric={"a": num(min=10.0, max=30.0), "z": num(min=-4.0, max=-4.0)}), rules, seed=seed)
    a = out.numeric["a"]
    assert a.min is not None and a.max is not None
    assert 10.0 - 0.05 * 20.0 <= a.min < 10.0
    assert 30.0 < a.max <= 30.0 + 0.05 * 20.0
    # range 0: the scale is |value|
    z = out.numeric["z"]
    assert z.min is not None and z.max is not None
    assert -4.0 - 0.05 * 4.0 <= z.min < -4.0 < z.max <= -4.0 + 0.05 * 4.0
    assert out.refused == {}


def test_min_max_noisy_scale_is_one_for_a_constant_zero_column() -> None:
    rules = DisclosureRules(min_max="noisy", min_max_noise=0.5)
    for seed in range(20):
        part = apply(reply(numeric={"a": num(min=0.0, max=0.0)}), rules, seed=seed).numeric["a"]
        assert part.min is not None and part.max is not None
        assert -0.5 <= part.min < 0.0 < part.max <= 0.5


def test_min_max_noisy_varies_with_the_rng_and_spreads_over_the_bound() -> None:
    rules = DisclosureRules(min_max="noisy", min_max_noise=0.1)
    mins = []
    for seed in range(200):
        part = apply(reply(numeric={"a": num(min=0.0, max=100.0)}), rules, seed=seed).numeric["a"]
        assert part.min is not None
        mins.append(part.min)
    assert len(set(mins)) == 200
    assert min(mins) < -9.0 and max(mins) > -1.0


def test_min_max_noisy_is_stable_per_column_for_the_same_seed() -> None:
    # With an rng seeded the same way (e.g. from a node secret and the dataset id) a column's
    # noisy min/max does not change with the other columns asked for: no averaging it away.
    rules = DisclosureRules(min_max="noisy")
    alone = apply(reply(numeric={"a": num(min=1.0, max=5.0)}), rules, seed=7).numeric["a"]
    both = apply(reply(numeric={"b": num(min=0.0, max=1.0), "a": num(min=1.0, max=5.0)}), rules, seed=7)
    assert both.numeric["a"] == alone
    assert apply(reply(numeric={"a": num(min=1.0, max=5.0)}), rules, seed=8).numeric["a"] != alone


def test_min_max_noisy_with_only_one_present_and_infinite_values() -> None:
    rules = DisclosureRules(min_max="noisy", min_max_noise=0.05)
    part = apply(reply(numeric={"a": num(min=20.0)}), rules).numeric["a"]
    assert part.max is None and part.min is not None and 19.0 <= part.min < 20.0
    part = apply(reply(numeric={"a": num(min=-math.inf, max=3.0)}), rules).numeric["a"]
    assert part.min == -math.inf and part.max is not None and 3.0 < part.max <= 3.15


# --- covariance -------------------------------------------------------------------------------


def test_covariance_passes_when_every_pair_has_enough_rows() -> None:
    c = cov(["a", "b"], [[20, 15], [15, 18]])
    assert apply(reply(covariance=c)).covariance == c


def test_covariance_with_a_small_pair_is_refused_whole() -> None:
    out = apply(reply(covariance=cov(["a", "b", "c"], [[20, 15, 12], [15, 18, 7], [12, 7, 30]])))
    assert out.covariance is None
    assert out.refused[COVARIANCE_KEY] == (
        "min_count: the pair (b, c) has 7 complete rows, fewer than this node's minimum of 10 (disclosure.min_count)"
    )


def test_covariance_of_an_excluded_column_is_refused() -> None:
    out = apply(reply(covariance=cov(["a", "id"], [[20, 20], [20, 20]])), DisclosureRules(excluded_columns=("id",)))
    assert out.covariance is None
    assert out.refused[COVARIANCE_KEY] == "excluded by the node's operator (disclosure.excluded_columns): id"


# --- quantile counts --------------------------------------------------------------------------


def test_quantile_counts_are_kept_for_columns_that_pass_min_count() -> None:
    out = apply(reply(numeric={"a": num(50, below=[1, 2, 25, 50]), "b": num(5, below=[1, 5])}))
    assert out.numeric["a"].below == [1, 2, 25, 50]
    assert "b" not in out.numeric and "b" in out.refused


def test_reply_survives_the_wire() -> None:
    r = reply(
        numeric={"x": num(50, histogram_edges=[0.0, 1.0, 2.0], histogram=[1, 49], min=0.0, max=2.0)},
        categorical={"c": cat({"a": 1, "b": 49})},
    )
    out = apply(r, DisclosureRules(min_max="noisy"))
    assert msgspec.json.decode(msgspec.json.encode(out), type=FAReply) == out
