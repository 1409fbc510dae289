"""Federated preprocessing on real nodes equals the same steps fitted on the pooled rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from federation import HEARTBEAT, NodeProcess, wait_until
from test_analytics import clinical_frame

from fedlab import Researcher
from fedlab.node.config import load_config
from fedlab.node.registry import DatasetRegistry

pytestmark = pytest.mark.integration

SIZES = (200, 150, 92)


@pytest.fixture
def sites(tmp_path, address):
    frame = clinical_frame()
    # each site's instrument shifts and scales two measurements: a batch effect to harmonise
    parts, start = [], 0
    for i, size in enumerate(SIZES):
        part = frame.iloc[start:start + size].reset_index(drop=True).copy()
        part["s1"] = part["s1"] * (1 + 0.1 * i) + 10 * i
        part["s5"] = part["s5"] + 0.3 * i
        parts.append(part)
        start += size
    nodes = [NodeProcess.create(tmp_path, f"site-{i}", address, frame=part, tags=("diabetes",))
             for i, part in enumerate(parts)]
    for node in nodes:
        node.start()
    yield parts, nodes
    for node in nodes:
        node.stop()


def derived_frames(nodes, name: str) -> list[pd.DataFrame]:
    frames = []
    for node in nodes:
        registry = DatasetRegistry(load_config(node.directory).db_path)
        frames.append(pd.read_csv(registry.get(name).path))
    return frames


def test_pipeline_equals_pooled_fit_and_leaves_sources_untouched(sites, address):
    parts, nodes = sites
    sources = [(n.directory.parent / f"{n.directory.name}.csv").read_bytes() for n in nodes]
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
        r.wait_for_nodes(3, timeout=30)
        fds = r.search("diabetes")
        pipe = r.preprocess(fds).impute(["bmi"], strategy="median").impute(["bp"], strategy="mean")
        pipe = pipe.impute(["sex"], strategy="most_frequent").standardize(["age", "bmi", "bp"]).onehot(["sex"])
        derived = pipe.apply(name="clean", tags=["diabetes-clean"])
        assert len(derived) == 3 and pipe.dropped == {}
        info = derived.dataset(nodes[0].node_id)
        assert info.derived_from == fds.dataset(nodes[0].node_id).dataset_id and len(info.steps) == 5
        again = r.search("diabetes-clean")
        assert sorted(again.node_ids()) == sorted(derived.node_ids())
        stats = r.stats(again, stats=["count", "mean"], columns=["age", "bmi"])
        assert abs(stats.global_stats().loc["bmi", "mean"]) < 1e-9

    pooled = pd.concat(parts, ignore_index=True)
    # the median is found from the nodes' counts below thresholds on their grids, where their cut
    # rules let them answer: within the bound the pipeline states; every later step is exact given it
    median = pipe.steps[0]["values"]["bmi"]
    (note,) = [n for n in pipe.notes if n.startswith("median of 'bmi'")]
    bound = float(note.split("within ± ")[1].split()[0])
    assert 0 < bound <= 1.0 and abs(median - pooled["bmi"].median()) <= bound + 1e-9, (median, note)
    expected = pooled.copy()
    expected["bmi"] = expected["bmi"].fillna(median)
    expected["bp"] = expected["bp"].fillna(pooled["bp"].mean())
    expected["sex"] = expected["sex"].fillna(pooled["sex"].mode().sort_values().iloc[0])
    for column in ("age", "bmi", "bp"):
        expected[column] = (expected[column] - expected[column].mean()) / expected[column].std(ddof=0)
    got = pd.concat(derived_frames(nodes, "clean"), ignore_index=True)
    for column in ("age", "bmi", "bp", "s1", "target"):
        np.testing.assert_allclose(got[column], expected[column], rtol=1e-9, atol=1e-12, err_msg=column)
    for level in sorted(pooled["sex"].dropna().unique()):
        assert got[f"sex={level}"].tolist() == (expected["sex"] == level).astype(float).tolist()
    assert [(n.directory.parent / f"{n.directory.name}.csv").read_bytes() for n in nodes] == sources


def test_combat_equals_pooled_combat_and_state_survives_a_restart(sites, address):
    from fedlab.preprocessing.combat import combat_pooled

    parts, nodes = sites
    columns = ["age", "s1", "s5", "target"]
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
        r.wait_for_nodes(3, timeout=30)
        fds = r.search("diabetes")
        pipe = r.preprocess(fds).combat(columns)
        nodes[1].stop()  # the pipeline's state lives in the node's SQLite file
        nodes[1].start()
        wait_until(lambda: nodes[1].node_id in r.online_node_ids() and "connected to researcher" in
                   nodes[1].log().split("received SIGTERM")[-1], 30, "the restarted node")
        pipe.apply(name="harmonised", tags=["diabetes-harmonised"])
        assert pipe.dropped == {}
    pooled = pd.concat(parts, ignore_index=True)
    batch = pd.Series(np.repeat(np.arange(3), SIZES))
    expected = combat_pooled(pooled, batch, columns)
    got = pd.concat(derived_frames(nodes, "harmonised"), ignore_index=True)
    for column in columns:
        np.testing.assert_allclose(got[column], expected[column], rtol=1e-9, atol=1e-9, err_msg=column)
    # the site effect is gone: site means of s1 now agree far better than before
    before = pooled.groupby(batch)["s1"].mean()
    after = got.groupby(batch)["s1"].mean()
    assert after.max() - after.min() < 0.2 * (before.max() - before.min())


def test_a_failing_node_is_reported_not_fatal(sites, address):
    parts, nodes = sites
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
        r.wait_for_nodes(3, timeout=30)
        fds = r.search("diabetes")
        nodes[2].kill()
        pipe = r.preprocess(fds, timeout=3).standardize(["age"])
        assert list(pipe.dropped) == [nodes[2].node_id]
        derived = pipe.apply(name="partial", tags=["x"])
        assert sorted(derived.node_ids()) == sorted(n.node_id for n in nodes[:2])
        assert nodes[2].node_id in derived.missing


def test_refusals_come_back_per_node_with_the_rule(sites, address):
    from test_analytics import set_rules

    from fedlab import FedlabError

    _, nodes = sites
    nodes[1].stop()
    set_rules(nodes[1], enabled=False)
    nodes[2].stop()
    set_rules(nodes[2], excluded_columns=["bmi"])
    nodes[1].start()
    nodes[2].start()
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
        r.wait_for_nodes(3, timeout=30)
        fds = r.search("diabetes")
        pipe = r.preprocess(fds).standardize(["age"])
        assert list(pipe.dropped) == [nodes[1].node_id]
        assert "disclosure.enabled" in pipe.dropped[nodes[1].node_id]
        with pytest.raises(FedlabError, match=r"withheld bmi: excluded .*disclosure.excluded_columns"):
            pipe.standardize(["bmi"])
