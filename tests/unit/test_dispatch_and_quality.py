"""The node's dispatch table (exactly one reply, errors as data) and the data-quality check."""

from __future__ import annotations

import time
import warnings

import pandas as pd
import pytest

from fedlab import DataQualityWarning, FedlabDataQualityError, FedlabNodeError, Researcher
from fedlab.errors import FedlabDatasetError
from fedlab.node.config import init_node_dir
from fedlab.node.dispatch import Dispatcher
from fedlab.node.registry import DatasetRegistry
from fedlab.protocol import (
    DatasetInfo,
    DatasetListReply,
    DatasetSearchRequest,
    ErrorReply,
    PingReply,
    PingRequest,
    make_envelope,
)
from fedlab.researcher import check_data_quality
from fedlab.transport import InMemoryResearcherTransport, NodeDirectory


def make_dispatcher(tmp_path, name="site", frame=None, tags=("bc",)):
    config = init_node_dir(tmp_path / name, name)
    registry = DatasetRegistry(config.db_path)
    if frame is not None:
        csv = tmp_path / f"{name}.csv"
        frame.to_csv(csv, index=False)
        registry.add("data", list(tags), "csv", csv)
    return Dispatcher(config.node_id, name, registry)


FRAME = pd.DataFrame({"age": [50, 61, 47], "size": [1.5, 2.0, 0.7], "label": ["a", "b", "a"]})


def test_search_answers_with_info_but_never_the_path(tmp_path):
    d = make_dispatcher(tmp_path, frame=FRAME)
    request = make_envelope(DatasetSearchRequest(tags=["bc"]), "r")
    reply = d.handle(request)
    assert reply.parent_id == request.msg_id
    (info,) = reply.content.datasets
    assert info.columns == ["age", "size", "label"] and info.shape == [3, 3]
    assert str(tmp_path) not in repr(reply.content)


def test_handler_that_raises_gives_one_error_reply(tmp_path):
    d = make_dispatcher(tmp_path)

    def broken(envelope):
        raise RuntimeError("disk on fire")

    d.table["ping_request"] = broken
    request = make_envelope(PingRequest(), "r")
    reply = d.handle(request)
    assert isinstance(reply.content, ErrorReply) and reply.parent_id == request.msg_id
    assert reply.content.code == "internal_error" and "internal error, reference" in reply.content.message
    assert "disk on fire" not in reply.content.message  # a bug's text stays in the node's log
    d.table["ping_request"] = lambda env: (_ for _ in ()).throw(FedlabDatasetError("no such dataset"))
    assert d.handle(request).content.code == "dataset_error"


def test_type_without_handler_gets_unknown_type(tmp_path):
    d = make_dispatcher(tmp_path)
    reply = d.handle(make_envelope(DatasetListReply(datasets=[]), "r"))
    assert reply.content.code == "unknown_type" and "dataset_list_reply" in reply.content.message


def test_researcher_over_the_twin_with_real_dispatchers(tmp_path):
    """The in-memory twin lets the whole researcher API run against real node dispatchers."""
    transport = InMemoryResearcherTransport()
    for i in range(3):
        d = make_dispatcher(tmp_path, f"site-{i}", frame=FRAME.iloc[: i + 1])
        transport.add_node(d.node_id, d.name, d.handle)
    with Researcher(transport=transport) as r:
        fds = r.search("bc")
        assert len(fds) == 3 and sorted(d["shape"][0] for d in fds.data().values()) == [1, 2, 3]
        assert set(r.list_datasets().node) == {"site-0", "site-1", "site-2"}
        assert all(isinstance(e.content, PingReply) for e in r.ping().replies().values())


def test_search_reports_node_errors(tmp_path):
    transport = InMemoryResearcherTransport()
    good = make_dispatcher(tmp_path, "good", frame=FRAME)
    transport.add_node(good.node_id, "good", good.handle)
    transport.add_node("node-bad", "bad", lambda env: make_envelope(
        ErrorReply(code="boom", message="broken disk", node="node-bad"), "node-bad", parent_id=env.msg_id))
    with Researcher(transport=transport) as r, pytest.raises(FedlabNodeError, match="broken disk") as info:
        r.search("bc")
    assert info.value.errors == {"node-bad": ("boom", "broken disk")}


def test_node_holding_two_matching_datasets_is_an_error(tmp_path):
    d = make_dispatcher(tmp_path, frame=FRAME)
    csv = tmp_path / "again.csv"
    FRAME.to_csv(csv, index=False)
    d.registry.add("data-2", ["bc"], "csv", csv)
    transport = InMemoryResearcherTransport()
    transport.add_node(d.node_id, d.name, d.handle)
    with Researcher(transport=transport) as r, pytest.raises(FedlabDatasetError, match="add a tag"):
        r.search("bc")


def info(**kw):
    base = dict(dataset_id="d", name="n", tags=["t"], data_type="csv", shape=[3, 2],
                columns=["a", "b"], dtypes={"a": "int64", "b": "object"})
    base.update(kw)
    return DatasetInfo(**base)


def test_quality_same_structure_passes_and_int_float_are_one_kind():
    check_data_quality({"n1": info(), "n2": info(dtypes={"a": "float64", "b": "object"})})


def test_quality_names_missing_and_extra_columns():
    with pytest.raises(FedlabDataQualityError) as err:
        check_data_quality({"n1": info(), "n2": info(columns=["a", "c"], dtypes={"a": "int64", "c": "object"})})
    msg = str(err.value)
    assert "n2" in msg and "'b'" in msg and "'c'" in msg


def test_quality_names_dtype_differences():
    with pytest.raises(FedlabDataQualityError, match=r"b \(int64 vs object\)"):
        check_data_quality({"n1": info(), "n2": info(dtypes={"a": "int64", "b": "int64"})})


def test_quality_refuses_mixed_types():
    with pytest.raises(FedlabDataQualityError, match="different types"):
        check_data_quality({"n1": info(), "n2": info(data_type="images")})


def test_quality_warns_on_image_shapes():
    img = dict(data_type="images", columns=[], dtypes={}, channels=3)
    with pytest.warns(DataQualityWarning, match="n1: 28x28x3, n2: 32x32x3"):
        check_data_quality({"n1": info(image_shape=[28, 28], **img), "n2": info(image_shape=[32, 32], **img)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_data_quality({"n1": info(image_shape=[28, 28], **img), "n2": info(image_shape=[28, 28], **img)})


def test_directory_marks_silent_nodes_offline_and_tells_listeners():
    directory = NodeDirectory()
    events = []
    directory.add_listener(lambda n, s: events.append((n, s)))
    directory.seen("n1", "one", "online", interval=0.1)
    directory.seen("n1", state="busy")
    directory.sweep(now=time.time() + 1.0)
    assert directory.get("n1").status == "offline"
    directory.seen("n1")
    assert events == [("n1", "online"), ("n1", "busy"), ("n1", "offline"), ("n1", "online")]
