"""What a node's error replies may say: no path on the node, no data value, no foreign exception text."""

from __future__ import annotations

import logging
import os
import re

import pandas as pd
import pytest

from fedlab.analytics.partials import numeric_partial
from fedlab.errors import FedlabConfigError, FedlabDatasetError, FedlabError
from fedlab.node.config import init_node_dir
from fedlab.node.dispatch import Dispatcher
from fedlab.node.registry import DatasetRegistry
from fedlab.node.safe_errors import REDACTED, new_reference, path_forms, redact
from fedlab.preprocessing import apply_transform, combat_local_params, combat_pooled
from fedlab.protocol import ErrorReply, PingRequest, make_envelope

CELL = "P1000"  # a cell value that must never reach the researcher


# -- redact -------------------------------------------------------------------------------
def test_redact_replaces_each_path_and_anything_below_it():
    paths = ["/srv/node", "/data/site/cohort.csv"]
    message = ("no dataset 'x' (see `fedlab node dataset list /srv/node`); the registry /srv/node/node.db "
               "is locked; reading /data/site/cohort.csv failed; '/srv/node/derived/a b.csv' too.")
    out = redact(message, paths)
    assert "/srv/node" not in out and "/data/site" not in out and "node.db" not in out
    assert "derived" not in out and "cohort" not in out
    assert out == ("no dataset 'x' (see `fedlab node dataset list <path on the node>`); the registry "
                   "<path on the node> is locked; reading <path on the node> failed; '<path on the node> b.csv' too.")


def test_redact_keeps_punctuation_and_other_text():
    assert redact("stored in /srv/node.", ["/srv/node"]) == f"stored in {REDACTED}."
    assert redact("at /srv/node: gone", ["/srv/node/"]) == f"at {REDACTED}: gone"
    assert redact("column 'age' is not numeric", ["/srv/node"]) == "column 'age' is not numeric"
    assert redact("a/b and /other/place", ["/srv/node"]) == "a/b and /other/place"


def test_redact_prefers_the_longest_path_and_ignores_useless_ones():
    assert redact("file /srv/node/data/x.csv", ["/srv/node", "/srv/node/data/x.csv"]) == f"file {REDACTED}"
    # the root, a bare drive or an empty string would redact every slash: they are ignored
    assert redact("a/b /c", ["/", "", "C:\\"]) == "a/b /c"
    assert redact("", ["/srv/node"]) == ""
    assert redact(r"in C:\nodes\site-a\data.csv", [r"C:\nodes\site-a"]) == f"in {REDACTED}"


def test_path_forms_adds_resolved_spellings(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    forms = path_forms([str(link), None, "", "data"])
    assert str(link) in forms and str(real) in forms
    assert "data" not in forms  # a bare relative name would redact that word in every message
    assert os.path.abspath("data") in forms
    message = redact(f"cannot read {real}/x.csv nor {link}/y.csv", forms)
    assert str(tmp_path) not in message and message.count(REDACTED) == 2


def test_references_are_short_random_hex():
    refs = {new_reference() for _ in range(50)}
    assert len(refs) == 50 and all(re.fullmatch(r"[0-9a-f]{6,16}", r) for r in refs)


# -- the dispatcher -----------------------------------------------------------------------
def make_dispatcher(tmp_path, *, with_dataset: bool = True, node_dir: bool = True):
    config = init_node_dir(tmp_path / "site", "site")
    registry = DatasetRegistry(config.db_path)
    csv = tmp_path / "cohort.csv"
    if with_dataset:
        pd.DataFrame({"id": [CELL, "P1001"], "age": [50, 60]}).to_csv(csv, index=False)
        registry.add("cohort", ["bc"], "csv", csv)
    return Dispatcher(config.node_id, "site", registry, node_dir=config.directory if node_dir else None), csv


def test_a_bug_never_sends_its_text_but_a_reference_that_is_logged(tmp_path, caplog):
    d, csv = make_dispatcher(tmp_path)

    def broken(envelope):
        raise ValueError(f"Unable to parse string {CELL!r} at position 0 in {csv} "
                         "(IsADirectoryError: [Errno 21] Is a directory: '/srv/node/data/x.csv')")

    d.table["ping_request"] = broken
    request = make_envelope(PingRequest(), "r")
    with caplog.at_level(logging.ERROR, logger="fedlab.node"):
        reply = d.handle(request)
    content = reply.content
    assert isinstance(content, ErrorReply) and content.code == "internal_error" and reply.parent_id == request.msg_id
    assert CELL not in content.message and str(tmp_path) not in content.message
    assert "/srv/node" not in content.message and "ValueError" not in content.message
    ref = re.search(r"reference ([0-9a-f]+)\)", content.message)
    assert ref, content.message
    assert content.message == (f"node site could not answer this ping_request request (internal error, reference "
                               f"{ref.group(1)}); the node's operator finds the details in node.log under that "
                               "reference")
    (record,) = [r for r in caplog.records if ref.group(1) in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert CELL in str(record.exc_info[1])  # the full story stays on the node
    # each failure gets its own reference
    assert d.handle(request).content.message != content.message


def test_fedlab_error_messages_lose_the_node_dir_and_dataset_paths(tmp_path, caplog):
    d, csv = make_dispatcher(tmp_path)
    node_dir = tmp_path / "site"

    def refuse(envelope):
        raise FedlabDatasetError(f"see `fedlab node dataset list {node_dir}`; {csv} is unreadable; "
                                 f"{node_dir.resolve()}/derived/x.csv is gone")

    d.table["ping_request"] = refuse
    with caplog.at_level(logging.WARNING, logger="fedlab.node"):
        reply = d.handle(make_envelope(PingRequest(), "r"))
    assert reply.content.code == "dataset_error"
    message = reply.content.message
    assert str(tmp_path) not in message and "cohort.csv" not in message and "derived" not in message
    assert message.count(REDACTED) == 3 and message.startswith("see `fedlab node dataset list <path on the node>`")
    assert str(csv) in caplog.text  # the operator's log keeps the message as it was


def test_the_registry_unknown_dataset_error_goes_out_without_the_node_dir(tmp_path):
    from fedlab.analytics.messages import FARequest

    d, _ = make_dispatcher(tmp_path, node_dir=False)  # the registry's own directory is redacted too
    reply = d.handle(make_envelope(FARequest(dataset_id="nope", stats=["count"]), "r"))
    assert reply.content.code == "dataset_error" and "nope" in reply.content.message
    assert str(tmp_path) not in reply.content.message and REDACTED in reply.content.message


def test_a_dataset_registered_later_is_redacted_too(tmp_path):
    d, _ = make_dispatcher(tmp_path, with_dataset=False)
    message = {"text": "nothing yet"}
    d.table["ping_request"] = lambda env: (_ for _ in ()).throw(FedlabError(message["text"]))
    assert d.handle(make_envelope(PingRequest(), "r")).content.message == "nothing yet"  # paths now cached
    late = tmp_path / "elsewhere" / "late.csv"
    late.parent.mkdir()
    pd.DataFrame({"a": [1]}).to_csv(late, index=False)
    d.registry.add("late", ["x"], "csv", late)
    message["text"] = f"{late} is unreadable"
    assert d.handle(make_envelope(PingRequest(), "r")).content.message == f"{REDACTED} is unreadable"


def test_an_unreadable_registry_never_costs_the_reply(tmp_path):
    d, _ = make_dispatcher(tmp_path)
    node_dir = tmp_path / "site"

    class Broken:
        db_path = None

        def list(self):
            raise OSError("disk gone")

    d.registry = Broken()  # type: ignore[assignment]
    d.table["ping_request"] = lambda env: (_ for _ in ()).throw(FedlabConfigError(f"{node_dir}/config.toml bad"))
    reply = d.handle(make_envelope(PingRequest(), "r"))
    assert reply.content.code == "config_error" and reply.content.message == f"{REDACTED} bad"


# -- messages raised on data that holds strings -------------------------------------------
FRAME = pd.DataFrame({"id": [CELL, "P1001", "P1002"], "age": [50.0, None, 61.0], "bmi": [20.0, 22.0, 30.0]})


def _message(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    return str(excinfo.value)


def test_partials_on_a_string_column_never_quote_it(monkeypatch):
    with pytest.raises(FedlabDatasetError) as excinfo:
        numeric_partial(FRAME["id"])
    assert CELL not in _message(excinfo) and "'id'" in _message(excinfo)
    # a column that passes for numeric but holds a string somewhere: the conversion's text quotes it
    import fedlab.analytics.partials as partials

    monkeypatch.setattr(partials, "is_numeric", lambda series: True)
    mixed = pd.Series([1, CELL, 2.5], dtype=object, name="mixed")
    with pytest.raises(FedlabDatasetError) as excinfo:
        numeric_partial(mixed)
    message = _message(excinfo)
    assert CELL not in message and "'mixed'" in message and "numbers" in message
    assert CELL in str(excinfo.value.__cause__)  # chained, for the node's log


def test_partials_on_huge_integers_is_a_dataset_error():
    with pytest.raises(FedlabDatasetError, match="'big'"):
        numeric_partial(pd.Series([10**400, 1], dtype=object, name="big"))


@pytest.mark.parametrize("edges", [[0, CELL], [object(), 1]])
def test_bad_edges_and_thresholds_name_the_argument_only(edges):
    with pytest.raises(FedlabConfigError, match="histogram's edges must all be numbers") as excinfo:
        numeric_partial(pd.Series([1.0, 2.0]), histogram_edges=edges)
    assert CELL not in _message(excinfo) and "object" not in _message(excinfo)
    with pytest.raises(FedlabConfigError, match="quantile thresholds must all be numbers") as excinfo:
        numeric_partial(pd.Series([1.0, 2.0]), thresholds=edges)
    assert CELL not in _message(excinfo)


@pytest.mark.parametrize("kind", ["standardize", "minmax", "combat"])
def test_transforms_on_a_string_column_never_quote_it(kind):
    spec = {
        "standardize": {"type": "standardize", "columns": ["id"], "mean": {"id": 0.0}, "scale": {"id": 1.0}},
        "minmax": {"type": "minmax", "columns": ["id"], "min": {"id": 0.0}, "max": {"id": 1.0}},
        "combat": {"type": "combat", "columns": ["id"], "alpha": {"id": 0.0}, "sigma": {"id": 1.0},
                   "gamma_star": {"id": 0.0}, "delta_star": {"id": 1.0}},
    }[kind]
    with pytest.raises(FedlabConfigError) as excinfo:
        apply_transform(FRAME, spec)
    message = _message(excinfo)
    assert CELL not in message and "'id'" in message and "numeric" in message
    assert CELL in str(excinfo.value.__cause__)


def test_impute_with_a_non_number_never_quotes_it():
    spec = {"type": "impute", "columns": ["age"], "values": {"age": CELL}}
    with pytest.raises(FedlabConfigError, match="cannot be imputed") as excinfo:
        apply_transform(FRAME, spec)
    assert CELL not in _message(excinfo) and "'age'" in _message(excinfo)


def test_combat_on_a_string_column_never_quotes_it():
    with pytest.raises(FedlabConfigError) as excinfo:
        combat_local_params(FRAME, ["bmi", "id"], {"bmi": 0.0, "id": 0.0}, {"bmi": 1.0, "id": 1.0})
    assert CELL not in _message(excinfo) and "'id'" in _message(excinfo)
    with pytest.raises(FedlabConfigError) as excinfo:
        combat_pooled(FRAME, pd.Series(["a", "a", "b"]), ["bmi", "id"])
    assert CELL not in _message(excinfo)
