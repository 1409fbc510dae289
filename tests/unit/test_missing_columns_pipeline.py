"""A pipeline over three sites, one of which never measured two columns (in memory, real node
dispatchers): every step is fitted on the sites that have values, applied on all, and equals the
fit on the pooled rows; the site is named. Also the transforms and the data-quality check for
such a column."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from fedlab import DataQualityWarning, Researcher
from fedlab.analytics.disclosure import DisclosureRules
from fedlab.errors import FedlabError
from fedlab.node.config import init_node_dir
from fedlab.node.dispatch import Dispatcher
from fedlab.node.registry import DatasetRegistry
from fedlab.preprocessing.combat import combat_local_params, combat_pooled
from fedlab.preprocessing.fit import combat_global_params
from fedlab.preprocessing.transforms import apply_transform
from fedlab.protocol import DatasetInfo
from fedlab.researcher import check_data_quality
from fedlab.transport import InMemoryResearcherTransport

SIZES = (200, 150, 92)
BLANK = ("s1", "sex")  # never measured at the third site


def cohort() -> list[pd.DataFrame]:
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True, scaled=False).frame
    frame["sex"] = frame["sex"].map({1.0: "f", 2.0: "m"})
    frame.loc[np.random.default_rng(5).random(len(frame)) < 0.1, "bmi"] = np.nan
    parts, start = [], 0
    for size in SIZES:
        parts.append(frame.iloc[start:start + size].reset_index(drop=True).copy())
        start += size
    for column in BLANK:
        parts[2][column] = np.nan
    return parts


@pytest.fixture
def sites(tmp_path):
    parts = cohort()
    transport = InMemoryResearcherTransport()
    dispatchers = []
    for i, part in enumerate(parts):
        config = init_node_dir(tmp_path / f"site-{i}", f"site-{i}")
        registry = DatasetRegistry(config.db_path)
        csv = tmp_path / f"site-{i}.csv"
        part.to_csv(csv, index=False)
        registry.add("diabetes", ["diabetes"], "csv", csv)
        d = Dispatcher(config.node_id, f"site-{i}", registry, DisclosureRules(min_max="exact"),
                       node_dir=config.directory)
        transport.add_node(d.node_id, d.name, d.handle)
        dispatchers.append(d)
    with Researcher(transport=transport) as r:
        yield r, parts, dispatchers


def derived(dispatchers, name: str) -> pd.DataFrame:
    return pd.concat([pd.read_csv(d.registry.get(name).path) for d in dispatchers], ignore_index=True)


def search(r):
    with pytest.warns(DataQualityWarning, match=r"column 'sex' is float64 on node-"):
        return r.search("diabetes")


def test_every_fitted_step_equals_the_pooled_fit_and_names_the_site(sites):
    r, parts, dispatchers = sites
    third = dispatchers[2]
    pipe = r.preprocess(search(r))
    with pytest.warns(DataQualityWarning) as caught:
        pipe = (pipe.impute(["s1", "bmi"], strategy="mean").standardize(["s1", "age", "bmi"])
                .minmax(["s2", "s1"]).impute(["sex"], strategy="most_frequent").onehot(["sex"]))
        out = pipe.apply(name="clean", tags=["clean"])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 5 and all("fitted without site-2, which holds no value of it" in m for m in messages)
    assert [(n.step, n.step_type, n.column, n.nodes) for n in pipe.not_contributing] == [
        (0, "impute", "s1", (third.node_id,)), (1, "standardize", "s1", (third.node_id,)),
        (2, "minmax", "s1", (third.node_id,)), (3, "impute", "sex", (third.node_id,)),
        (4, "onehot", "sex", (third.node_id,))]
    assert pipe.dropped == {} and len(out) == 3 and out.notes == pipe.notes and "site-2" in repr(out)
    values = pipe.steps[0]["values"]
    assert out.dataset(third.node_id).steps[0] == (
        f"impute(s1={values['s1']:.10g}, bmi={values['bmi']:.10g}; no values of s1 here: fitted on the other sites)")
    assert all("no values" not in s for s in out.dataset(dispatchers[0].node_id).steps)

    # the same steps on the pooled rows: every fit leaves missing values out, so the third site's
    # rows take part in none of s1's or sex's fits and take every fitted step
    expected = pd.concat(parts, ignore_index=True)
    for column in ("s1", "bmi"):
        expected[column] = expected[column].fillna(expected[column].mean())
    is_third = np.arange(len(expected)) >= SIZES[0] + SIZES[1]
    for column in ("s1", "age", "bmi"):
        fitted = expected.loc[~is_third, column] if column == "s1" else expected[column]
        expected[column] = (expected[column] - fitted.mean()) / fitted.std(ddof=0)
    for column in ("s2", "s1"):
        fitted = expected.loc[~is_third, column] if column == "s1" else expected[column]
        expected[column] = (expected[column] - fitted.min()) / (fitted.max() - fitted.min())
    expected["sex"] = expected["sex"].fillna(expected["sex"].mode().sort_values().iloc[0])
    got = derived(dispatchers, "clean")
    for column in ("s1", "age", "bmi", "s2", "s3"):
        np.testing.assert_allclose(got[column], expected[column], rtol=1e-9, atol=1e-12, err_msg=column)
    assert got.loc[is_third, "s1"].nunique() == 1  # the imputed value, scaled like every value
    for level in ("f", "m"):
        assert got[f"sex={level}"].tolist() == (expected["sex"] == level).astype(float).tolist()
    assert got["sex=<other>"].sum() == 0


def test_combat_fits_each_column_on_the_sites_that_have_it(sites):
    r, parts, dispatchers = sites
    columns = ["s1", "s2", "s5", "age"]
    with pytest.warns(DataQualityWarning, match=r"step 1 \(combat\) of 's1' was fitted without site-2"):
        r.preprocess(search(r)).combat(columns).apply(name="harmonised", tags=["harmonised"])
    pooled = pd.concat(parts, ignore_index=True)
    batch = pd.Series(np.repeat(np.arange(3), SIZES))
    expected = combat_pooled(pooled, batch, columns)
    got = derived(dispatchers, "harmonised")
    for column in columns:
        np.testing.assert_allclose(got[column], expected[column], rtol=1e-9, atol=1e-9, err_msg=column)
    assert got["s1"].iloc[SIZES[0] + SIZES[1]:].isna().all()


def test_a_column_no_site_has_values_of_is_a_clear_error(sites, tmp_path):
    r, _, dispatchers = sites
    pipe = r.preprocess(search(r))
    for d in dispatchers[:2]:  # the first two sites' datasets stay registered; leave them out
        pipe.dropped[d.node_id] = "left out by the test"
    for step in (lambda: pipe.standardize(["s1"]), lambda: pipe.impute(["s1"], strategy="median"),
                 lambda: pipe.onehot(["sex"]), lambda: pipe.impute(["sex"], strategy="most_frequent")):
        with pytest.raises(FedlabError, match=r"no site in the pipeline holds a value of it \(site-2 answered"):
            step()
    with pytest.raises(FedlabError, match='strategy="constant"'):
        pipe.impute(["s1"], strategy="mean")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a constant needs no fit: nothing to say about the site
        pipe.impute(["s1", "sex"], strategy="constant", fill_value=0).impute(["s3"], strategy="constant",
                                                                              fill_value="x")
    assert pipe.steps[0]["values"] == {"s1": 0, "sex": 0} and pipe.not_contributing == []
    with pytest.raises(FedlabError, match="fill_value, a finite number"):
        pipe.impute(["s1"], strategy="constant", fill_value=float("nan"))
    with pytest.raises(FedlabError, match="fill_value is for"):
        pipe.impute(["s1"], strategy="mean", fill_value=1.0)


def test_a_site_withholding_a_few_values_still_stops_the_fit(tmp_path):
    """Only "no values at all" is answered without a refusal: a site holding 1 to min_count - 1
    values of a column withholds it, and the step cannot be fitted, exactly as before."""
    parts = cohort()
    parts[2].loc[:4, "s1"] = 190.0  # five values at the third site
    transport = InMemoryResearcherTransport()
    for i, part in enumerate(parts):
        config = init_node_dir(tmp_path / f"site-{i}", f"site-{i}")
        registry = DatasetRegistry(config.db_path)
        part.to_csv(tmp_path / f"site-{i}.csv", index=False)
        registry.add("diabetes", ["diabetes"], "csv", tmp_path / f"site-{i}.csv")
        d = Dispatcher(config.node_id, f"site-{i}", registry, node_dir=config.directory)
        transport.add_node(d.node_id, d.name, d.handle)
    with Researcher(transport=transport) as r:
        pipe = r.preprocess(search(r))
        with pytest.raises(FedlabError, match=r"withheld s1: min_count: 5 real"):
            pipe.standardize(["s1"])


# --- transforms and the quality check -------------------------------------------------------------


def test_impute_fills_a_column_without_values_with_the_value_as_it_is():
    blank = pd.DataFrame({"sex": [np.nan] * 3, "n": [np.nan, 1.0, np.nan]})
    out = apply_transform(blank, {"type": "impute", "columns": ["sex", "n"], "values": {"sex": "f", "n": "2"}})
    assert out["sex"].tolist() == ["f", "f", "f"] and out["n"].tolist() == [2.0, 1.0, 2.0]
    number = apply_transform(blank, {"type": "impute", "columns": ["sex"], "values": {"sex": 3}})
    assert number["sex"].tolist() == [3.0, 3.0, 3.0]


def test_federated_combat_equals_pooled_with_a_batch_without_one_column():
    rng = np.random.default_rng(1)
    batches = []
    for b in range(3):
        batches.append(pd.DataFrame({c: rng.normal(10 + b, 1 + 0.3 * b + 0.1 * i, 40)
                                     for i, c in enumerate("wxyz")}))
    batches[1]["y"] = np.nan
    columns = list("wxyz")
    moments = {str(b): {c: (int(f[c].notna().sum()), float(f[c].mean()), float(((f[c] - f[c].mean()) ** 2).sum()))
                        for c in columns if f[c].notna().any()} for b, f in enumerate(batches)}
    glob = combat_global_params(moments)
    got = []
    for f in batches:
        empty = [c for c in columns if f[c].isna().all()]
        gamma, delta = combat_local_params(f, columns, glob["alpha"], glob["sigma"], without=empty)
        spec = {"type": "combat", "columns": columns, **glob, "gamma_star": gamma, "delta_star": delta}
        got.append(apply_transform(f, spec))
    expected = combat_pooled(pd.concat(batches, ignore_index=True), pd.Series(np.repeat([0, 1, 2], 40)), columns)
    pd.testing.assert_frame_equal(pd.concat(got, ignore_index=True), expected, rtol=1e-9, atol=1e-9)
    assert expected["y"].iloc[40:80].isna().all() and expected["y"].notna().sum() == 80


def info(**dtypes: str) -> DatasetInfo:
    return DatasetInfo(dataset_id="d", name="n", tags=["t"], data_type="csv", shape=[3, len(dtypes)],
                       columns=list(dtypes), dtypes=dtypes)


def test_quality_check_warns_on_a_column_one_site_has_no_value_of():
    with pytest.warns(DataQualityWarning, match=r"column 'sex' is float64 on n3 but object on the other nodes"):
        check_data_quality({"n1": info(age="int64", sex="object"), "n2": info(age="float64", sex="object"),
                            "n3": info(age="int64", sex="float64")})
    with pytest.warns(DataQualityWarning, match=r"float64 on n1, n3 but bool"):  # the first node may be the one
        check_data_quality({"n1": info(flag="float64"), "n2": info(flag="bool"), "n3": info(flag="float64")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numeric column without values cannot be told from the DatasetInfo
        check_data_quality({"n1": info(chol="int64"), "n2": info(chol="float64")})
    from fedlab import FedlabDataQualityError

    with pytest.raises(FedlabDataQualityError, match=r"sex \(int64 vs object\)"):  # int64 always holds values
        check_data_quality({"n1": info(sex="object"), "n2": info(sex="float64"), "n3": info(sex="int64")})
