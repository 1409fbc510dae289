"""The node's side of preprocessing: fits under the disclosure rules, states that survive a restart,
derived datasets with their lineage, and refusals that say what to do."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image

from fedlab.analytics.disclosure import DisclosureRules
from fedlab.errors import FedlabDatasetError, FedlabDisclosureError, FedlabProtocolError
from fedlab.node.config import init_node_dir
from fedlab.node.dispatch import Dispatcher
from fedlab.node.preproc_handler import PreprocHandler
from fedlab.node.preproc_state import PreprocStateStore
from fedlab.node.registry import DatasetRegistry
from fedlab.preprocessing.combat import combat_local_params
from fedlab.preprocessing.messages import PreprocReply, PreprocRequest
from fedlab.protocol import ErrorReply, make_envelope

FRAME = pd.DataFrame({
    "age": [30.0 + i for i in range(20)],
    "bmi": [20.0 + (i % 5) for i in range(20)],
    "ward": ["a", "b"] * 10,
})


def standardize_spec(column: str, mean: float, std: float) -> dict:
    return {"type": "standardize", "columns": [column], "mean": {column: mean}, "scale": {column: std}}


@pytest.fixture
def node(tmp_path):
    config = init_node_dir(tmp_path / "node", "node")
    registry = DatasetRegistry(config.db_path)

    def add(name, frame=FRAME):
        path = tmp_path / f"{name}.csv"
        frame.to_csv(path, index=False)
        return registry.add(name, ["t"], "csv", path)

    def handler(**rules):
        return PreprocHandler(registry, DisclosureRules(**rules), node_id=config.node_id,
                              node_dir=config.directory)

    return config, registry, add, handler


def request(dataset_id, step, args=None, *, state_id=None, preproc_type="standardize"):
    return PreprocRequest(dataset_id=dataset_id, preproc_type=preproc_type, preproc_step=step,
                          preproc_id="p1", preproc_args=args or {}, state_id=state_id)


def test_fit_returns_partials_after_rules_on_the_transformed_data(node):
    _, _, add, handler = node
    source = add("d")
    h = handler(cell_threshold=3)
    reply = h(request(source.dataset_id, "fit", {"columns": ["age", "ward"], "stats": ["count", "mean"],
                                                  "stats_args": {}}))
    assert reply.partials is not None and reply.state_id.startswith("state-")
    assert reply.partials.numeric["age"].count == 20 and reply.partials.numeric["age"].mean == pytest.approx(39.5)
    mean, std = FRAME["age"].mean(), FRAME["age"].std(ddof=0)
    state = h(request(source.dataset_id, "set", {"transform": standardize_spec("age", mean, std)},
                      state_id=reply.state_id)).state_id
    again = h(request(source.dataset_id, "fit", {"columns": ["age"], "stats": ["mean", "var"]}, state_id=state))
    assert again.partials is not None and again.partials.numeric["age"].mean == pytest.approx(0, abs=1e-12)
    assert again.partials.numeric["age"].m2 == pytest.approx(20)
    # value counts go through the node's rules: a count below cell_threshold leaves as None
    counts = h(request(source.dataset_id, "fit", {"columns": ["ward"], "stats": [],
                                                   "stats_args": {"ward": {"value_counts": {}}}}))
    assert counts.partials is not None and counts.partials.categorical["ward"].value_counts == {"a": 10, "b": 10}
    with pytest.raises(FedlabDisclosureError, match="min_count"):
        handler(min_count=50)(request(source.dataset_id, "fit", {"columns": ["age"], "stats": ["mean"]}))


def test_set_and_apply_make_a_derived_dataset_with_lineage(node, tmp_path):
    config, registry, add, handler = node
    source = add("d")
    before = (tmp_path / "d.csv").read_bytes()
    h = handler()
    spec = standardize_spec("bmi", 22.0, 1.5)
    state = h(request(source.dataset_id, "set", {"transform": spec})).state_id
    reply = h(request(source.dataset_id, "apply", {"name": "d-clean", "tags": ["clean"], "description": "std"},
                      state_id=state))
    assert isinstance(reply, PreprocReply) and reply.derived is not None and reply.partials is None
    assert reply.state_id != state
    info = reply.derived
    assert info.name == "d-clean" and info.tags == ["clean"] and info.derived_from == source.dataset_id
    assert len(info.steps) == 1 and "bmi" in info.steps[0]
    record = registry.get("d-clean")
    assert record.path.startswith(str(config.directory / "derived")) and record.to_info() == info
    expected = FRAME.copy()
    expected["bmi"] = (expected["bmi"] - 22.0) / 1.5
    pd.testing.assert_frame_equal(pd.read_csv(record.path), expected)
    assert (tmp_path / "d.csv").read_bytes() == before
    assert not list((config.directory / "derived").glob("*.tmp"))
    with pytest.raises(FedlabDatasetError, match="already registered"):
        h(request(source.dataset_id, "apply", {"name": "d-clean", "tags": ["clean"]}, state_id=state))
    assert len(list((config.directory / "derived").iterdir())) == 1  # the refused one left nothing


def test_state_survives_a_restart(node):
    config, registry, add, handler = node
    source = add("d")
    state = handler()(request(source.dataset_id, "set", {"transform": standardize_spec("age", 39.5, 2.0)})).state_id
    store = PreprocStateStore(config.db_path)  # a fresh store and handler on the same database
    assert store.get(state) == ("p1", source.dataset_id, [standardize_spec("age", 39.5, 2.0)])
    fresh = PreprocHandler(DatasetRegistry(config.db_path), DisclosureRules(), node_id=config.node_id,
                           node_dir=config.directory)
    reply = fresh(request(source.dataset_id, "fit", {"columns": ["age"], "stats": ["mean"]}, state_id=state))
    assert reply.partials is not None and reply.partials.numeric["age"].mean == pytest.approx(0)


def test_refusals_say_what_to_do(node, tmp_path):
    _, _, add, handler = node
    source, other = add("d"), add("e")
    h = handler()
    with pytest.raises(FedlabDatasetError, match="unknown preprocessing state .* start again from its first step"):
        h(request(source.dataset_id, "fit", {"stats": ["mean"]}, state_id="state-nope"))
    state = h(request(other.dataset_id, "fit", {"columns": ["age"], "stats": ["mean"]})).state_id
    with pytest.raises(FedlabDatasetError, match=f"made from dataset {other.dataset_id}"):
        h(request(source.dataset_id, "fit", {"stats": ["mean"]}, state_id=state))
    with pytest.raises(FedlabProtocolError, match="unknown preprocessing type") as exc:
        h(request(source.dataset_id, "fit", preproc_type="pca"))
    assert exc.value.code == "invalid_field" and exc.value.field == "preproc_type"
    with pytest.raises(FedlabProtocolError, match="unknown preprocessing step") as exc:
        h(request(source.dataset_id, "refit"))
    assert exc.value.code == "invalid_field"
    with pytest.raises(FedlabProtocolError, match="unknown statistics"):
        h(request(source.dataset_id, "fit", {"stats": ["mode"]}))
    with pytest.raises(FedlabDisclosureError, match="disclosure.enabled"):
        handler(enabled=False)(request(source.dataset_id, "fit", {"stats": ["mean"]}))
    with pytest.raises(FedlabDatasetError, match=r"columns \['height'\] are not in this dataset"):
        h(request(source.dataset_id, "set", {"transform": standardize_spec("height", 0.0, 1.0)}))
    with pytest.raises(FedlabProtocolError, match="transform spec of type 'standardize'"):
        h(request(source.dataset_id, "set", {"transform": {"type": "minmax", "columns": ["age"]}}))
    with pytest.raises(FedlabProtocolError, match="no steps yet"):
        h(request(source.dataset_id, "apply", {"name": "x", "tags": ["t"]}))


def test_image_dataset_is_refused(node, tmp_path):
    _, registry, _, handler = node
    for label in ("cat", "dog"):
        (tmp_path / "img" / label).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "img" / label / "0.png")
    images = registry.add("pics", ["t"], "images", tmp_path / "img")
    with pytest.raises(FedlabDatasetError, match="preprocessing needs a CSV dataset"):
        handler()(request(images.dataset_id, "fit", {"stats": ["mean"]}))


def test_combat_set_keeps_local_estimates_on_the_node(node):
    config, _, add, handler = node
    source = add("d")
    spec = {"type": "combat", "columns": ["age", "bmi"], "alpha": {"age": 40.0, "bmi": 22.0},
            "sigma": {"age": 6.0, "bmi": 1.5}}
    reply = handler()(request(source.dataset_id, "set", {"transform": spec}, preproc_type="combat"))
    assert reply.partials is None and reply.derived is None
    assert set(msgspec_fields(reply)) == {"state_id"}
    _, _, chain = PreprocStateStore(config.db_path).get(reply.state_id, source.dataset_id)
    stored = chain[-1]
    assert {k: stored[k] for k in spec} == spec
    assert set(stored["gamma_star"]) == {"age", "bmi"} and set(stored["delta_star"]) == {"age", "bmi"}
    gamma, delta = combat_local_params(FRAME, spec["columns"], spec["alpha"], spec["sigma"])
    assert stored["gamma_star"] == pytest.approx(gamma) and stored["delta_star"] == pytest.approx(delta)


def msgspec_fields(reply: PreprocReply) -> list[str]:
    """The fields a reply actually carries on the wire (defaults are left out)."""
    import msgspec

    return [k for k, v in msgspec.structs.asdict(reply).items() if v is not None]


def test_dispatcher_answers_preproc_requests_only_with_a_node_directory(node):
    config, registry, add, _ = node
    source = add("d")
    envelope = make_envelope(request(source.dataset_id, "fit", {"columns": ["age"], "stats": ["mean"]}), "r")
    without = Dispatcher(config.node_id, "node", registry).handle(envelope).content
    assert isinstance(without, ErrorReply) and without.code == "config_error"
    assert "node directory" in without.message
    reply = Dispatcher(config.node_id, "node", registry, node_dir=config.directory).handle(envelope).content
    assert isinstance(reply, PreprocReply) and reply.partials is not None
    refused = Dispatcher(config.node_id, "node", registry, node_dir=config.directory).handle(
        make_envelope(request(source.dataset_id, "fit", state_id="state-gone"), "r")).content
    assert isinstance(refused, ErrorReply) and refused.code == "dataset_error"
