"""The node's audit log: hash chain, tamper detection, what a line may and may not contain."""

from __future__ import annotations

import json
import logging

import pytest

from fedlab.analytics.messages import FAReply, FARequest
from fedlab.node.audit import GENESIS, AuditLog, outcome_of, read_entries, summarize, verify
from fedlab.protocol import ErrorReply, Header, PingReply, PingRequest, make_envelope
from fedlab.training.messages import TrainingPlanApproveRequest
from fedlab.training.source import plan_id


def write_n(path, n: int) -> None:
    log = AuditLog(path)
    for i in range(n):
        request = make_envelope(PingRequest(), f"researcher-{i}")
        log.record_reply(request, make_envelope(PingReply(node_name="a"), "node", parent_id=request.msg_id))
    log.close()


def test_lines_chain_and_verify(tmp_path):
    path = tmp_path / "audit.log"
    write_n(path, 3)
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["prev"] == GENESIS
    assert verify(path).ok and verify(path).n_lines == 3
    entry = json.loads(lines[1])
    assert entry["sender"] == "researcher-1" and entry["msg_type"] == "ping_request"
    assert entry["outcome"] == "ok" and entry["peer"] is None and entry["time"].endswith("+00:00")


def test_reopening_continues_the_chain(tmp_path):
    path = tmp_path / "audit.log"
    write_n(path, 2)
    write_n(path, 2)  # a node restart
    assert verify(path).ok and verify(path).n_lines == 4


@pytest.mark.parametrize("tamper, line", [
    (lambda ls: [ls[0], ls[1].replace(b"researcher-1", b"researcher-X"), *ls[2:]], 3),  # edited: next link breaks
    (lambda ls: [ls[0], *ls[2:]], 2),  # a line removed
    (lambda ls: [ls[0], ls[0], *ls[1:]], 2),  # a line inserted (replayed)
    (lambda ls: [ls[0], ls[1][:-5], *ls[2:]], 2),  # a line cut (not JSON any more)
])
def test_verify_names_the_first_broken_line(tmp_path, tamper, line):
    path = tmp_path / "audit.log"
    write_n(path, 4)
    path.write_bytes(b"\n".join(tamper(path.read_bytes().splitlines())) + b"\n")
    result = verify(path)
    assert not result.ok and result.broken_line == line and result.reason


def test_a_line_cut_short_by_a_crash_stays_visible(tmp_path):
    path = tmp_path / "audit.log"
    write_n(path, 2)
    path.write_bytes(path.read_bytes() + b'{"time": "2026')  # the process died mid-write
    write_n(path, 1)
    assert path.read_bytes().count(b"\n") == 4
    result = verify(path)
    assert result.broken_line == 3
    assert [e.get("unreadable") is not None for e in read_entries(path)] == [False, False, True, False]


def test_a_failed_write_is_logged_not_raised(tmp_path, caplog):
    path = tmp_path / "audit.log"
    path.mkdir()  # cannot be opened as a file
    with caplog.at_level(logging.ERROR, logger="fedlab.node.audit"):
        log = AuditLog(path)
        request = make_envelope(PingRequest(), "r")
        log.record_reply(request, make_envelope(PingReply(node_name="a"), "n"))
        log.record_refusal("malformed", "junk", None)
    assert "AUDIT LOG NOT WRITTEN" in caplog.text
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1  # once per run of failures


def test_summary_names_the_question_never_values():
    request = FARequest(dataset_id="dataset-1", stats=["count", "quantiles", "histogram"], columns=["age", "bmi"],
                        stats_args={"age": {"histogram": {"edges": [17.123, 40.5, 99.25]}}},
                        thresholds={"bmi": [31.4159, 27.1828]})
    asked = summarize(request)
    assert asked == {"dataset_id": "dataset-1", "stats": ["count", "quantiles", "histogram"],
                     "columns": ["age", "bmi"], "stats_args": {"age": ["histogram"]}, "quantile_columns": ["bmi"]}
    text = json.dumps(asked)
    assert "31.4159" not in text and "17.123" not in text


def test_summary_of_a_plan_is_its_id_not_its_source():
    source = "class Secret:\n    token = 'do-not-log'\n"
    asked = summarize(TrainingPlanApproveRequest(plan_source=source, plan_class="Secret", researcher_id="r"))
    assert asked["plan_id"] == plan_id(source) and asked["plan_class"] == "Secret"
    assert "do-not-log" not in json.dumps(asked)


def test_outcomes():
    assert outcome_of(PingReply(node_name="a")) == {"outcome": "ok"}
    assert outcome_of(ErrorReply(code="disclosure_refused", message="min_count"))["outcome"] == "refused"
    assert outcome_of(ErrorReply(code="not_approved", message="plan"))["outcome"] == "refused"
    assert outcome_of(ErrorReply(code="dataset_error", message="no such"))["outcome"] == "error"
    partial = outcome_of(FAReply(dataset_id="d", n_rows=5, refused={"age": "min_count 10"}))
    assert partial == {"outcome": "ok", "refused_columns": ["age"]}


def test_refusal_before_dispatch_keeps_what_the_header_said(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    header = Header(msg_id="m-1", msg_type="fa_request", sender="r-1", version="1.0", time=0.0)
    log.record_refusal("too_large", "message of 9 bytes exceeds", header, size=9, n_frames=3)
    log.record_refusal("malformed", "unreadable header", None, size=4, n_frames=1)
    log.close()
    first, second = read_entries(path)
    assert (first["msg_id"], first["sender"], first["code"], first["asked"]) == ("m-1", "r-1", "too_large",
                                                                                  {"bytes": 9, "frames": 3})
    assert second["sender"] is None and second["outcome"] == "refused"
