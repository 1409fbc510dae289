"""The node's analytics handler: checks in order, refusals that name their rule, only what was asked."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image

from fedlab.analytics.disclosure import DisclosureRules
from fedlab.analytics.messages import FARequest
from fedlab.errors import FedlabDatasetError, FedlabDisclosureError, FedlabProtocolError
from fedlab.node.analytics_handler import AnalyticsHandler
from fedlab.node.config import init_node_dir
from fedlab.node.registry import DatasetRegistry

FRAME = pd.DataFrame({
    "age": [30 + i for i in range(20)],
    "ward": ["a", "b"] * 10,
    "score": [float(i % 7) for i in range(20)],
})


@pytest.fixture
def setup(tmp_path):
    config = init_node_dir(tmp_path / "node", "node")
    registry = DatasetRegistry(config.db_path)

    def add(name, frame):
        path = tmp_path / f"{name}.csv"
        frame.to_csv(path, index=False)
        return registry.add(name, ["t"], "csv", path).dataset_id

    def handler(**rules):
        return AnalyticsHandler(registry, DisclosureRules(**rules), node_id=config.node_id)

    return registry, add, handler, tmp_path


def test_answers_only_what_was_asked(setup):
    _, add, handler, _ = setup
    dataset = add("d", FRAME)
    reply = handler()(FARequest(dataset_id=dataset, stats=["mean"]))
    assert set(reply.numeric) == {"age", "score"}
    assert reply.categorical["ward"].value_counts == {}  # no value counts unless asked for
    assert reply.numeric["age"].histogram is None and reply.covariance is None
    asked = handler()(FARequest(dataset_id=dataset, stats=[], stats_args={"ward": {"value_counts": {}}}))
    assert asked.categorical["ward"].value_counts == {"a": 10, "b": 10} and set(asked.numeric) == set()


def test_switched_off_node_refuses_naming_the_rule(setup):
    _, add, handler, _ = setup
    with pytest.raises(FedlabDisclosureError, match="disclosure.enabled"):
        handler(enabled=False)(FARequest(dataset_id=add("d", FRAME), stats=["mean"]))


def test_dataset_below_min_count_is_refused_whole(setup):
    _, add, handler, _ = setup
    with pytest.raises(FedlabDisclosureError, match=r"min_count: .* 5 rows, fewer than .* 10"):
        handler()(FARequest(dataset_id=add("small", FRAME.head(5)), stats=["mean"]))


def test_bad_requests_get_clear_errors(setup):
    registry, add, handler, tmp_path = setup
    dataset = add("d", FRAME)
    with pytest.raises(FedlabProtocolError, match="unknown statistics"):
        handler()(FARequest(dataset_id=dataset, stats=["mode"]))
    with pytest.raises(FedlabDatasetError, match=r"columns \['height'\] are not in this dataset"):
        handler()(FARequest(dataset_id=dataset, stats=["mean"], columns=["height"]))
    with pytest.raises(FedlabDatasetError, match="unknown|no dataset|not registered"):
        handler()(FARequest(dataset_id="dataset-nope", stats=["mean"]))
    images = tmp_path / "images" / "cls"
    images.mkdir(parents=True)
    for i in range(3):
        Image.new("L", (4, 4)).save(images / f"{i}.png")
    image_id = registry.add("imgs", ["i"], "images", tmp_path / "images").dataset_id
    with pytest.raises(FedlabDatasetError, match="statistics need a CSV dataset"):
        handler()(FARequest(dataset_id=image_id, stats=["mean"]))


def test_excluded_column_asked_for_is_refused_by_name(setup):
    _, add, handler, _ = setup
    reply = handler(excluded_columns=("age",))(FARequest(dataset_id=add("d", FRAME), stats=["mean"],
                                                       columns=["age", "score"]))
    assert "age" not in reply.numeric and "excluded" in reply.refused["age"]
    assert "score" in reply.numeric


def test_noise_is_the_same_on_every_request(setup):
    """Asking again must not give fresh noise that could be averaged away."""
    _, add, handler, _ = setup
    dataset = add("d", FRAME)
    node = handler(min_max="noisy")
    request = FARequest(dataset_id=dataset, stats=["min", "max"], columns=["age"])
    first, second = node(request), node(request)
    assert first.numeric["age"].min == second.numeric["age"].min < 30
    assert first.numeric["age"].max == second.numeric["age"].max > 49


def test_changed_file_is_read_again(setup):
    registry, add, handler, tmp_path = setup
    dataset = add("d", FRAME)
    node = handler()
    assert node(FARequest(dataset_id=dataset, stats=["count"], columns=["age"])).numeric["age"].count == 20
    pd.concat([FRAME, FRAME]).to_csv(registry.get(dataset).path, index=False)
    assert node(FARequest(dataset_id=dataset, stats=["count"], columns=["age"])).numeric["age"].count == 40
