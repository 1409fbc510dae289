"""Federated preprocessing equals the pooled computation (scikit-learn, pandas, ComBat).

The data is split over 3 "nodes"; each sends partials (numeric_partial / categorical_partial),
the researcher merges them and fits the spec, each node applies it to its part, and the parts
put back together must equal the transform fitted on the pooled data to rel 1e-9.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_diabetes
from sklearn.impute import SimpleImputer
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from fedlab.analytics.merge import merge_categorical, merge_numeric
from fedlab.analytics.partials import categorical_partial, numeric_partial
from fedlab.errors import FedlabConfigError, FedlabDatasetError, FedlabError
from fedlab.preprocessing import (
    apply_chain,
    apply_transform,
    combat_global_params,
    combat_local_params,
    combat_pooled,
    describe_spec,
    impute_params,
    minmax_params,
    onehot_params,
    standardize_params,
)

TOL = {"rtol": 1e-9, "atol": 1e-12}
NUM = ["age", "bmi", "bp", "s1", "s5"]


@pytest.fixture
def data() -> pd.DataFrame:
    frame = load_diabetes(as_frame=True, scaled=False).frame
    rng = np.random.default_rng(7)
    frame = frame.copy()
    for c in ("bmi", "bp", "s5"):
        frame.loc[rng.random(len(frame)) < 0.1, c] = np.nan
    frame["site"] = rng.choice(["north", "south", "east", "west", "rare"], p=[.4, .3, .2, .095, .005],
                               size=len(frame))
    frame.loc[rng.random(len(frame)) < 0.05, "site"] = None
    frame.loc[frame.index[[3, 200, 400]], "site"] = "rare"  # in every node's part
    return frame


def split(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    n = len(frame)
    return {"n1": frame.iloc[: n // 5], "n2": frame.iloc[n // 5: n // 2], "n3": frame.iloc[n // 2:]}


def merged_numeric(parts: dict[str, pd.DataFrame], columns: list[str], with_min_max: bool = False) -> dict:
    return {c: merge_numeric({node: numeric_partial(p[c], with_min_max=with_min_max) for node, p in parts.items()})
            for c in columns}


def federated(parts: dict[str, pd.DataFrame], spec: dict) -> pd.DataFrame:
    return pd.concat([apply_transform(p, spec) for p in parts.values()])


def test_standardize_equals_standard_scaler(data: pd.DataFrame) -> None:
    parts = split(data)
    spec = standardize_params(merged_numeric(parts, NUM))
    out = federated(parts, spec)
    expected = StandardScaler().fit_transform(data[NUM])  # NaN are ignored in fit and kept
    np.testing.assert_allclose(out[NUM].to_numpy(), expected, **TOL)
    assert out["sex"].equals(data["sex"]) and list(out.columns) == list(data.columns)


def test_standardize_constant_column_divides_by_one() -> None:
    frame = pd.DataFrame({"c": [3.0] * 6, "d": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})
    parts = split(frame)
    spec = standardize_params(merged_numeric(parts, ["c", "d"]))
    assert spec["scale"]["c"] == 0.0
    np.testing.assert_allclose(federated(parts, spec).to_numpy(), StandardScaler().fit_transform(frame), **TOL)


def test_minmax_equals_minmax_scaler(data: pd.DataFrame) -> None:
    parts = split(data)
    spec = minmax_params(merged_numeric(parts, NUM, with_min_max=True))
    np.testing.assert_allclose(federated(parts, spec)[NUM].to_numpy(), MinMaxScaler().fit_transform(data[NUM]),
                               **TOL)


def test_minmax_without_exact_min_max_names_the_nodes(data: pd.DataFrame) -> None:
    merged = merged_numeric(split(data), ["age"])  # no min/max sent
    with pytest.raises(FedlabError, match=r"node\(s\) n2.*disclosure.min_max = \"exact\""):
        minmax_params(merged, withheld=["n2"])


@pytest.mark.parametrize("strategy", ["mean", "median"])
def test_impute_numeric_equals_simple_imputer(data: pd.DataFrame, strategy: str) -> None:
    parts = split(data)
    cols = ["bmi", "bp", "s5"]
    merged = merged_numeric(parts, cols)
    medians = {c: float(data[c].median()) for c in cols} if strategy == "median" else None  # the quantile search's job
    spec = impute_params(strategy, merged, {}, medians)
    expected = SimpleImputer(strategy=strategy).fit_transform(data[cols])
    out = federated(parts, spec)
    np.testing.assert_allclose(out[cols].to_numpy(), expected, **TOL)
    assert data["bmi"].isna().any()  # the input was not mutated


def test_impute_most_frequent_equals_simple_imputer(data: pd.DataFrame) -> None:
    frame = data.copy()
    frame["s4"] = frame["s4"].round(0)
    frame.loc[frame.index[::7], "s4"] = np.nan
    parts = split(frame)
    cols = ["s4", "site"]
    merged = {c: merge_categorical({n: categorical_partial(p[c]) for n, p in parts.items()}) for c in cols}
    spec = impute_params("most_frequent", {}, merged, None)
    assert isinstance(spec["values"]["s4"], float) and isinstance(spec["values"]["site"], str)
    out = federated(parts, spec)
    np.testing.assert_allclose(out["s4"].to_numpy(),
                               SimpleImputer(strategy="most_frequent").fit_transform(frame[["s4"]])[:, 0], **TOL)
    site = SimpleImputer(strategy="most_frequent", missing_values=pd.NA).fit_transform(
        frame[["site"]].astype(object).fillna(pd.NA))[:, 0]
    assert out["site"].tolist() == list(site)


def test_impute_most_frequent_ties_and_suppressed_values() -> None:
    frame = pd.DataFrame({"x": [2.0, 10.0, 10.0, 2.0, None], "s": ["b", "a", "b", "a", None]})
    merged = {c: merge_categorical({"n1": categorical_partial(frame[c])}) for c in frame}
    values = impute_params("most_frequent", {}, merged, None)["values"]
    assert values == {"x": 2.0, "s": "a"}  # numeric ties by number (not "10.0" < "2.0"), text by string
    nothing = merge_categorical({"n1": categorical_partial(frame["s"]).__class__(count=2, missing=0,
                                                                                   value_counts={"a": None})})
    with pytest.raises(FedlabError, match="no node disclosed"):
        impute_params("most_frequent", {}, {"s": nothing}, None)


def test_onehot_equals_get_dummies(data: pd.DataFrame) -> None:
    parts = split(data)
    merged = {"site": merge_categorical({n: categorical_partial(p["site"]) for n, p in parts.items()})}
    spec = onehot_params(merged)
    assert spec["other"] == {"site": True}  # always: nodes fold the levels they hold too rarely there
    out = federated(parts, spec)
    dummies = pd.get_dummies(data["site"], prefix="site", prefix_sep="=", dtype=np.float64)
    names = [c for c in out.columns if c.startswith("site=") and c != "site=<other>"]
    assert names == list(dummies.columns) == [f"site={v}" for v in sorted(data["site"].dropna().unique())]
    position = list(data.columns).index("site")
    assert list(out.columns) == (list(data.columns[:position]) + names + ["site=<other>"]
                                 + list(data.columns[position + 1:]))
    np.testing.assert_array_equal(out[names].to_numpy(), dummies.to_numpy())
    assert (out["site=<other>"] == 0).all()  # every value was disclosed: nothing falls there


def test_onehot_groups_suppressed_values_under_other(data: pd.DataFrame) -> None:
    parts = split(data)
    partials = {n: categorical_partial(p["site"]) for n, p in parts.items()}
    # disclosure rules on every node withheld the small "rare" count
    partials = {n: p.__class__(count=p.count, missing=p.missing,
                               value_counts={k: (None if k == "rare" else v) for k, v in p.value_counts.items()})
                for n, p in partials.items()}
    spec = onehot_params({"site": merge_categorical(partials)})
    assert "rare" not in spec["categories"]["site"] and spec["other"]["site"] is True
    out = federated(parts, spec)
    np.testing.assert_array_equal(out["site=<other>"].to_numpy(), (data["site"] == "rare").to_numpy(dtype=float))
    row_sums = out[[c for c in out.columns if c.startswith("site=")]].sum(axis=1).to_numpy()
    np.testing.assert_array_equal(row_sums, data["site"].notna().to_numpy(dtype=float))


def test_onehot_numeric_values_compare_as_str() -> None:
    frame = pd.DataFrame({"k": [1, 2, 2, 3]})
    spec = onehot_params({"k": merge_categorical({"n1": categorical_partial(frame["k"])})})
    out = apply_transform(frame, spec)
    assert list(out.columns) == ["k=1", "k=2", "k=3", "k=<other>"]
    np.testing.assert_array_equal(out.to_numpy()[:, :3], pd.get_dummies(frame["k"], dtype=float).to_numpy())


def _batched(data: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], pd.Series]:
    """Three sites with their own offsets and scales on each column: a batch effect to remove."""
    frame = data[NUM + ["s2", "s3"]].copy()
    rng = np.random.default_rng(11)
    labels = pd.Series(rng.choice(["a", "b", "c"], size=len(frame)), index=frame.index)
    for site, shift, mult in (("a", 0.0, 1.0), ("b", 0.3, 1.4), ("c", -0.5, 0.7)):
        rows = labels == site
        for c in frame.columns:
            mean, std = frame[c].mean(), frame[c].std()
            frame.loc[rows, c] = mean + (frame.loc[rows, c] - mean) * mult + shift * std
    parts = {site: frame[labels == site] for site in ("a", "b", "c")}
    return frame, parts, labels


def test_combat_federated_equals_pooled(data: pd.DataFrame) -> None:
    frame, parts, labels = _batched(data)
    cols = list(frame.columns)
    moments = {}
    for node, part in parts.items():
        moments[node] = {}
        for c in cols:
            p = numeric_partial(part[c])
            moments[node][c] = (p.count, p.mean, p.m2)
    spec = {"type": "combat", "columns": cols, **combat_global_params(moments)}
    out_parts = []
    for part in parts.values():
        gamma, delta = combat_local_params(part, cols, spec["alpha"], spec["sigma"])
        out_parts.append(apply_transform(part, {**spec, "gamma_star": gamma, "delta_star": delta}))
    out = pd.concat(out_parts).loc[frame.index]
    expected = combat_pooled(frame, labels, cols)
    np.testing.assert_allclose(out[cols].to_numpy(), expected[cols].to_numpy(), **TOL)
    # the batch effect is gone: site means of a column now agree far better than before
    before = frame.groupby(labels)["bmi"].mean()
    after = out.groupby(labels.loc[out.index])["bmi"].mean()
    assert after.std() < before.std() / 5
    assert out["bmi"].isna().equals(frame["bmi"].isna())


def test_combat_pooled_batch_effect_free_data_is_left_almost_unchanged(data: pd.DataFrame) -> None:
    frame = data[NUM].dropna()
    labels = pd.Series(np.arange(len(frame)) % 3, index=frame.index)
    out = combat_pooled(frame, labels, NUM)
    assert np.max(np.abs(out.to_numpy() - frame.to_numpy()) / frame.std().to_numpy()) < 0.2


def test_combat_errors(data: pd.DataFrame) -> None:
    with pytest.raises(FedlabConfigError, match="at least 2 columns"):
        combat_local_params(data, ["bmi"], {"bmi": 0.0}, {"bmi": 1.0})
    with pytest.raises(FedlabDatasetError, match="2 values"):
        combat_local_params(data.iloc[:1], ["bmi", "age"], {"bmi": 0.0, "age": 0.0}, {"bmi": 1.0, "age": 1.0})
    with pytest.raises(FedlabError, match="does not vary"):
        combat_global_params({"n1": {"x": (3, 1.0, 0.0)}, "n2": {"x": (2, 2.0, 0.0)}})


def test_apply_chain_and_describe(data: pd.DataFrame) -> None:
    specs = [{"type": "impute", "columns": ["bmi"], "values": {"bmi": 25.0}},
             {"type": "standardize", "columns": ["bmi", "age"], "mean": {"bmi": 25.0, "age": 50.0},
              "scale": {"bmi": 5.0, "age": 10.0}}]
    out = apply_chain(data, specs)
    np.testing.assert_allclose(out["bmi"].to_numpy(), (data["bmi"].fillna(25.0) - 25.0) / 5.0, **TOL)
    assert describe_spec(specs[1]) == "standardize(bmi, age)"
    assert describe_spec({"nonsense": 1}) == "?()"


@pytest.mark.parametrize(("spec", "message"), [
    ({"type": "rescale", "columns": ["age"]}, "unknown transform type 'rescale'"),
    ({"type": "standardize", "mean": {}, "scale": {}}, "needs 'columns'"),
    ({"type": "standardize", "columns": ["nope"], "mean": {}, "scale": {}}, r"\['nope'\] are not in the data"),
    ({"type": "standardize", "columns": ["age"], "mean": {"age": 1.0}}, "needs 'scale'"),
    ({"type": "minmax", "columns": ["age"], "min": {"age": 1.0}, "max": {}}, r"'max' has no value for columns"),
    ({"type": "standardize", "columns": ["site"], "mean": {"site": 0.0}, "scale": {"site": 1.0}}, "numeric column"),
    ({"type": "standardize", "columns": ["age"], "mean": {"age": "x"}, "scale": {"age": 1.0}}, "must be a number"),
    ({"type": "impute", "columns": ["bmi"], "values": {"bmi": "high"}}, "cannot be imputed"),
    ({"type": "onehot", "columns": ["site"], "categories": {"site": "ab"}, "other": {"site": False}},
     "list of strings"),
    ({"type": "combat", "columns": ["age"], "alpha": {"age": 0.0}, "sigma": {"age": 0.0},
      "gamma_star": {"age": 0.0}, "delta_star": {"age": 1.0}}, "sigma > 0"),
])
def test_invalid_specs_are_config_errors(data: pd.DataFrame, spec: dict, message: str) -> None:
    with pytest.raises(FedlabConfigError, match=message):
        apply_transform(data, spec)


def test_fit_errors() -> None:
    empty = merge_numeric({"n1": numeric_partial(pd.Series([np.nan, np.nan]))})
    with pytest.raises(FedlabError, match="no node holds a value"):
        standardize_params({"x": empty})
    with pytest.raises(FedlabConfigError, match="strategy"):
        impute_params("mode", {}, {}, None)
    with pytest.raises(FedlabError, match="needs its median"):
        impute_params("median", {"x": merge_numeric({"n1": numeric_partial(pd.Series([1.0, 2.0]))})}, {}, None)


def test_lineage_shows_fill_values_as_a_reader_writes_them():
    from fedlab.preprocessing.transforms import describe_spec

    spec = {"type": "impute", "columns": ["bmi", "sex"], "values": {"bmi": 25.70000000000003, "sex": "F"}}
    assert describe_spec(spec) == "impute(bmi=25.7, sex='F')"
    assert describe_spec({**spec, "values": {"bmi": 1 / 3, "sex": 2}}) == "impute(bmi=0.3333333333, sex=2)"
