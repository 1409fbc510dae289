"""Federated statistics from real nodes equal pandas on the pooled rows; disclosure rules hold."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from federation import HEARTBEAT, NodeProcess

from fedlab import FedlabError, FedlabNodeError, Researcher
from fedlab.researcher.jobs import FARequestJob

pytestmark = pytest.mark.integration

NUMERIC = ["age", "bmi", "bp", "s1", "s5", "target"]


def clinical_frame() -> pd.DataFrame:
    """scikit-learn's diabetes data in its original units, with a categorical sex column, a
    derived outcome category, and missing values blanked at seeded random places."""
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True, scaled=False).frame
    frame["sex"] = frame["sex"].map({1.0: "sex-1", 2.0: "sex-2"})
    frame["outcome"] = np.where(frame["target"] > 140, "progressed", "stable")
    rng = np.random.default_rng(3)
    for column in ("bmi", "bp", "s1"):
        frame.loc[rng.random(len(frame)) < 0.1, column] = np.nan
    frame.loc[rng.random(len(frame)) < 0.05, "sex"] = None
    return frame[["age", "sex", "bmi", "bp", "s1", "s5", "target", "outcome"]]


def set_rules(node: NodeProcess, **rules) -> None:
    path = node.directory / "config.toml"
    lines = path.read_text().splitlines()
    for key, value in rules.items():
        rendered = {True: "true", False: "false"}.get(value, None) if isinstance(value, bool) else None
        rendered = rendered or (f'"{value}"' if isinstance(value, str) else str(value).replace("'", '"'))
        lines = [f"{key} = {rendered}" if line.startswith(f"{key} =") else line for line in lines]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def clinical(tmp_path, address):
    """Three real nodes holding uneven parts (200, 150, 92 rows) of the clinical frame."""
    frame = clinical_frame()
    parts = [frame.iloc[:200], frame.iloc[200:350], frame.iloc[350:]]
    nodes = [NodeProcess.create(tmp_path, f"site-{i}", address, frame=part.reset_index(drop=True),
                                tags=("diabetes",)) for i, part in enumerate(parts)]
    yield frame, nodes
    for node in nodes:
        node.stop()


def start(nodes, address):
    for node in nodes:
        node.start()
    researcher = Researcher(address, heartbeat_interval=HEARTBEAT)
    researcher.wait_for_nodes(len(nodes), timeout=30)
    return researcher


def close(a, b, scale=1.0):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12 * scale)


def test_statistics_equal_pandas_on_the_pooled_rows(clinical, address):
    pooled, nodes = clinical
    for node in nodes:
        set_rules(node, min_max="exact", cell_threshold=1, max_bins_fraction=1.0)
    with start(nodes, address) as r:
        fds = r.search("diabetes")
        edges = [18, 30, 40, 50, 60, 80]
        result = r.stats(fds, stats=["count", "missing", "sum", "mean", "var", "std", "min", "max", "median",
                                     "quantiles", "value_counts", "cov", "corr"],
                         stats_args={"age": {"histogram": {"edges": edges}}, "bmi": {"histogram": {"bins": 12}},
                                     "sex": {"value_counts": {"dropna": False}}},
                         quantiles=[0.1, 0.25, 0.5, 0.9], crosstab=["sex", "outcome"])
        assert sorted(result.answered) == sorted(n.node_id for n in nodes)
        assert result.refused == {} and result.failed == {} and result.missing == {}
        table = result.global_stats()
        for column in NUMERIC:
            values = pooled[column]
            row = table.loc[column]
            scale = float(values.abs().max())
            assert row["count"] == values.count() and row["missing"] == values.isna().sum()
            for stat, expected in (("sum", values.sum()), ("mean", values.mean()), ("var", values.var()),
                                   ("std", values.std()), ("min", values.min()), ("max", values.max())):
                assert close(row[stat], expected, scale), (column, stat, row[stat], expected)
            span = values.max() - values.min()
            bounds = result.quantile_bounds()
            for q in (0.1, 0.25, 0.5, 0.9):
                got, bound = row[f"q{q:g}"], bounds.loc[(column, q)]
                if math.isnan(got):  # a node withheld the counts there (fewer than min_count on a side)
                    assert bound["approximate"] and any(column in line for line in result.notes()), (column, q)
                    continue
                # exact to the nodes' grid of thresholds, within the stated bound
                assert abs(got - values.quantile(q)) <= bound["half_width"] + 1e-6 * span, (column, q, got)
            assert not math.isnan(row["median"]), column
            assert abs(row["median"] - values.median()) <= bounds.loc[(column, 0.5), "half_width"] + 1e-6 * span
            assert row["nodes"] == 3
        hist = result.histogram("age")
        expected_age = np.histogram(pooled["age"].dropna(), bins=edges)[0].tolist()
        # a node withholds an edge with fewer than min_count of its values below or above it (here
        # the youngest site's 30 and 40): those bins say so; every other bin is exact
        whole = [not who for who in hist["suppressed_on"]]
        assert sum(whole) >= 3 and not all(whole)
        assert [c for c, ok in zip(hist["count"], whole, strict=True) if ok] == [
            e for e, ok in zip(expected_age, whole, strict=True) if ok]
        bmi = pooled["bmi"].dropna()
        hist = result.histogram("bmi")  # 12 bins over the federated range, on round edges
        edges = [*hist["left"], hist["right"].iloc[-1]]
        assert len(hist) == 12 and edges[0] <= bmi.min() and edges[-1] >= bmi.max()
        whole = [not who for who in hist["suppressed_on"]]
        assert sum(whole) >= 4 and set(hist["nodes"]) == {3}
        assert [c for c, ok in zip(hist["count"], whole, strict=True) if ok] == [
            e for e, ok in zip(np.histogram(bmi, bins=edges)[0].tolist(), whole, strict=True) if ok]
        counts = result.value_counts("sex").set_index("value")["count"].to_dict()
        assert counts.pop("<missing>") == pooled["sex"].isna().sum() > 0  # missing as its own level
        assert counts == pooled["sex"].value_counts().to_dict()
        assert table.loc["sex", "missing"] == pooled["sex"].isna().sum()
        crosstab = result.crosstab()
        expected = pd.crosstab(pooled["sex"], pooled["outcome"])
        assert crosstab.loc[expected.index, expected.columns].to_numpy().tolist() == expected.to_numpy().tolist()
        # a node whose missing values would single out 1-9 rows in a pairwise covariance refuses it
        # (disclosure.min_count); the others' covariance equals pandas on their pooled rows
        rows = {n.node_id: part for n, part in zip(nodes, (slice(0, 200), slice(200, 350), slice(350, None)),
                                                   strict=True)}
        sent = [n for n, reply in result.replies.items() if reply.covariance is not None]
        for node_id in set(rows) - set(sent):
            assert "min_count" in result.replies[node_id].refused["cov"]
        assert sent
        covered = pd.concat([pooled.iloc[rows[n]] for n in sorted(sent, key=list(rows).index)])
        pooled_cov = covered[NUMERIC].cov()
        pooled_corr = covered[NUMERIC].corr()
        cov = result.cov().loc[NUMERIC, NUMERIC]
        corr = result.corr().loc[NUMERIC, NUMERIC]
        np.testing.assert_allclose(cov.to_numpy(), pooled_cov.to_numpy(), rtol=1e-9)
        np.testing.assert_allclose(corr.to_numpy(), pooled_corr.to_numpy(), rtol=1e-9)
        per_node = result.node_stats()
        assert per_node.loc[("site-0", "age"), "count"] == 200


def test_small_value_counts_are_withheld_and_never_named(clinical, address):
    pooled, nodes = clinical
    set_rules(nodes[0], levels_max=100, levels_density=1.0)  # let site-0 list ages at all
    set_rules(nodes[1], excluded_columns=["age"])
    set_rules(nodes[2], enabled=False)
    with start(nodes, address) as r:
        fds = r.search("diabetes")
        result = r.stats(fds, stats=["value_counts"], columns=["age"])
        ages = result.value_counts("age")
        own = pooled["age"].iloc[:200].astype(str).value_counts()  # only site-0 answers for age
        shown = ages.dropna(subset=["count"]).set_index("value")["count"]
        assert shown.to_dict() == {v: n for v, n in own.items() if v in shown.index}  # exact where shown
        rare = {v for v, n in own.items() if n < 3}
        assert rare and not rare & set(ages["value"])  # a value held 1 or 2 times is never named
        withheld = result.withheld_levels()
        assert int(withheld.loc["site-0", "age"]) >= len(rare)
        assert len(shown) + int(withheld.loc["site-0", "age"]) == len(own)


def test_default_rules_suppress_withhold_and_say_so(clinical, address):
    pooled, nodes = clinical
    set_rules(nodes[1], excluded_columns=["age"])
    set_rules(nodes[2], enabled=False)
    with start(nodes, address) as r:
        fds = r.search("diabetes")
        result = r.stats(fds, stats=["count", "mean", "min", "max"], columns=["age", "bmi"])
        assert sorted(result.answered) == sorted([nodes[0].node_id, nodes[1].node_id])
        assert "disclosure.enabled" in result.refused[nodes[2].node_id]
        withheld = result.column_refusals()
        assert "age" in withheld[nodes[1].node_id]
        assert "bmi.min/max" in withheld[nodes[0].node_id]  # min/max are off by default
        table = result.global_stats()
        assert table.loc["age", "nodes"] == 1 and table.loc["bmi", "nodes"] == 2
        assert math.isnan(table.loc["bmi", "min"])
        assert table.loc["age", "count"] == pooled["age"].iloc[:200].count()
        assert any("site-2 refused" in line for line in result.notes())
        # age has too many levels for value counts under the default levels rules: refused, and said
        refused = r.stats(fds, stats=["value_counts"], columns=["age"]).column_refusals()
        assert "levels_max" in refused[nodes[0].node_id]["age.value_counts"]
        with pytest.raises(FedlabError, match="min_max"):
            r.stats(fds, stats=["histogram"], columns=["bmi"], bins=10)


def test_fa_request_job_keeps_the_seeds_semantics(clinical, address):
    _, nodes = clinical
    set_rules(nodes[2], enabled=False)
    with start(nodes, address) as r:
        fds = r.search("diabetes")
        kw = dict(researcher_id=r.id, requests=r.requests)
        with pytest.raises(FedlabError, match="either"):
            FARequestJob("exp", "fa", fds, None, None, **kw)
        with pytest.raises(FedlabError, match="mutually exclusive"):
            FARequestJob("exp", "fa", fds, {"age": {"mean": {}}}, ["mean"], **kw)
        with pytest.raises(FedlabError, match="dataset_schema"):
            FARequestJob("exp", "fa", fds, {"age": {"mean": {}}}, None, ["age"], **kw)
        ok = FARequestJob("exp", "fa", fds, None, ["mean"], ["age"], nodes=[nodes[0].node_id], **kw).execute()
        assert list(ok) == [nodes[0].node_id] and ok[nodes[0].node_id].numeric["age"].count == 200
        with pytest.raises(FedlabNodeError, match=nodes[2].node_id) as info:
            FARequestJob("exp", "fa", fds, None, ["mean"], ["age"], **kw).execute()
        assert info.value.errors[nodes[2].node_id][0] == "disclosure_refused"
