"""A column a site never measured, on real nodes: scikit-learn's diabetes data split over three
sites, the third of which has no total cholesterol (``s1``) or HDL (``s3``) in the CSV it holds.
Imputation and standardization are fitted on the two sites that have values, applied on all
three, equal the same steps fitted on the pooled rows, and the third site is named."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from federation import HEARTBEAT, NodeProcess
from test_analytics import clinical_frame
from test_preprocessing import SIZES, derived_frames

from fedlab import DataQualityWarning, FedlabError, Researcher

pytestmark = pytest.mark.integration

BLANK = ("s1", "s3")


@pytest.fixture
def sites(tmp_path, address):
    frame = clinical_frame()
    frame["s3"] = load_s3()
    parts, start = [], 0
    for size in SIZES:
        parts.append(frame.iloc[start:start + size].reset_index(drop=True).copy())
        start += size
    for column in BLANK:
        parts[2][column] = np.nan  # lab values the third site never measured: empty cells in its CSV
    nodes = [NodeProcess.create(tmp_path, f"site-{i}", address, frame=part, tags=("diabetes",))
             for i, part in enumerate(parts)]
    for node in nodes:
        node.start()
    yield parts, nodes
    for node in nodes:
        node.stop()


def load_s3() -> pd.Series:
    from sklearn.datasets import load_diabetes

    return load_diabetes(as_frame=True, scaled=False).frame["s3"]


def test_impute_and_standardize_fit_on_the_sites_with_values_and_name_the_other(sites, address):
    parts, nodes = sites
    third = nodes[2].node_id
    assert pd.read_csv(nodes[2].directory.parent / "site-2.csv")[list(BLANK)].isna().all().all()
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
        r.wait_for_nodes(3, timeout=30)
        fds = r.search("diabetes")
        with pytest.warns(DataQualityWarning) as caught:
            pipe = (r.preprocess(fds).impute(["s1", "bmi"], strategy="median").impute(["s3"], strategy="mean")
                    .standardize(["s1", "s3", "age", "bmi"]))
            derived = pipe.apply(name="clean", tags=["diabetes-clean"])
        warned = [str(w.message) for w in caught]
        assert [(n.step, n.column, n.nodes) for n in pipe.not_contributing] == [
            (0, "s1", (third,)), (1, "s3", (third,)), (2, "s1", (third,)), (2, "s3", (third,))]
        assert len(warned) == 4 and all("was fitted without site-2, which holds no value of it" in w for w in warned)
        assert pipe.dropped == {} and len(derived) == 3 and "site-2" in repr(derived)
        steps = derived.dataset(third).steps
        assert "no values of s1 here" in steps[0] and "no values of s3 here" in steps[1]
        assert "no values of s1, s3 here" in steps[2]
        assert all("no values" not in s for s in derived.dataset(nodes[0].node_id).steps)
        # statistics of the derived data still come from measured values only: the third site's s1
        # holds nothing but the imputed value, which it withholds like any column without real values
        stats = r.stats(r.search("diabetes-clean"), stats=["count", "mean"], columns=["s1", "s3"]).global_stats()
        assert stats.loc["s1", "count"] == SIZES[0] + SIZES[1] and abs(stats.loc["s3", "mean"]) < 1e-9

    pooled = pd.concat(parts, ignore_index=True)
    has = np.arange(len(pooled)) < SIZES[0] + SIZES[1]  # the rows of the sites that measured s1 and s3
    median = pipe.steps[0]["values"]["s1"]
    (note,) = [n for n in pipe.notes if n.startswith("median of 's1'")]
    bound = float(note.split("within ± ")[1].split()[0])
    assert abs(median - pooled.loc[has, "s1"].median()) <= bound + 1e-9, (median, note)
    assert pooled["s1"].median() == pooled.loc[has, "s1"].median()  # the pooled fit leaves missing values out
    assert pipe.steps[1]["values"]["s3"] == pytest.approx(pooled.loc[has, "s3"].mean(), rel=1e-12)
    # the pooled reference: the same steps, fitted on the pooled rows of the sites that have values
    expected = pooled.copy()
    expected["s1"] = expected["s1"].fillna(median)
    expected["bmi"] = expected["bmi"].fillna(pipe.steps[0]["values"]["bmi"])
    expected["s3"] = expected["s3"].fillna(pooled.loc[has, "s3"].mean())
    for column in ("s1", "s3", "age", "bmi"):
        fitted = expected.loc[has, column] if column in BLANK else expected[column]
        expected[column] = (expected[column] - fitted.mean()) / fitted.std(ddof=0)
    got = pd.concat(derived_frames(nodes, "clean"), ignore_index=True)
    for column in ("s1", "s3", "age", "bmi", "s5", "target"):
        np.testing.assert_allclose(got[column], expected[column], rtol=1e-9, atol=1e-12, err_msg=column)
    for column in BLANK:  # the third site took the imputed value, standardized like every value
        assert got.loc[~has, column].nunique() == 1


def test_a_column_no_site_measured_is_a_clear_error(sites, address):
    _, nodes = sites
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
        r.wait_for_nodes(3, timeout=30)
        fds = r.search("diabetes")
        pipe = r.preprocess(fds)
        pipe.dropped[nodes[0].node_id] = pipe.dropped[nodes[1].node_id] = "left out by the test"
        with pytest.raises(FedlabError, match=r"standardize cannot be fitted on 's1': no site in the pipeline holds "
                                              r"a value of it \(site-2 answered that they have none\)"):
            pipe.standardize(["s1", "age"])
        assert pipe.steps == [] and nodes[2].node_id not in pipe.dropped
