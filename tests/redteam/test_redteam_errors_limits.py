"""Red team, rules 6, 7 and 8: what errors say, how much a burst of requests costs the node, and
whether every refusal is on the record.

Error texts are written for a researcher who may be hostile: they never quote a patient id, a
value from the data, or a path on the node's disk, however the request was broken. A burst of 40
concurrent analytics requests gets exactly one reply each, the excess answered "busy" at once,
and the node stays up. Every refusal is a line of DIR/audit.log.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from redteam_harness import (
    Node,
    fa_part,
    is_error,
    one_raw_node,
    refusal_text,
    secret_strings,
    wait_until,
)

from fedlab.analytics.messages import FAReply
from fedlab.node.audit import AUDIT_FILE, verify
from fedlab.protocol import ErrorReply

pytestmark = pytest.mark.integration


def spec_set(raw, node, ds, spec, preproc_type=None):
    return raw.preproc(node.node_id, ds, preproc_type or spec.get("type", "standardize"), "set", {"transform": spec})


@pytest.mark.timeout(600)
def test_error_replies_never_quote_ids_values_or_paths(nodes, raw, tmp_path):
    """Attack: broken requests whose natural error text would quote the data or the disk: a
    standardize of patient_id (refused anyway) and of the string column hosp_code (pandas would
    say 'Unable to parse string "H12345"'), an impute of a numeric column with a string, malformed
    specs, a dataset whose CSV was replaced by a directory (Python would say 'Is a directory:
    /path'). Rule: no error reply contains 'P10', a value from the data, or the node's directory
    or a dataset's path."""
    (node,) = nodes(1, start=False)
    victim = node.add_dataset("victim", node.frame, ["victim"])
    node.start()
    raw.wait_for_node(node.node_id)
    ds = raw.dataset_id(node.node_id)
    victim_id = raw.dataset_id(node.node_id, "victim")
    cohort_state = spec_set(raw, node, ds, {"type": "standardize", "columns": ["age"], "mean": {"age": 0.0},
                                            "scale": {"age": 1.0}})
    assert not is_error(cohort_state), cohort_state
    attacks = {
        "standardize patient_id": lambda: spec_set(raw, node, ds, {
            "type": "standardize", "columns": ["patient_id"], "mean": {"patient_id": 0}, "scale": {"patient_id": 1}}),
        "standardize hosp_code": lambda: spec_set(raw, node, ds, {
            "type": "standardize", "columns": ["hosp_code"], "mean": {"hosp_code": 0}, "scale": {"hosp_code": 1}}),
        "minmax dx": lambda: spec_set(raw, node, ds, {
            "type": "minmax", "columns": ["dx"], "min": {"dx": 0}, "max": {"dx": 1}}),
        "combat hosp_code": lambda: spec_set(raw, node, ds, {
            "type": "combat", "columns": ["hosp_code"], "alpha": {"hosp_code": 0.0}, "sigma": {"hosp_code": 1.0}}),
        "impute chol with a string": lambda: spec_set(raw, node, ds, {
            "type": "impute", "columns": ["chol"], "values": {"chol": "not-a-number"}}),
        "impute chol with a list": lambda: spec_set(raw, node, ds, {
            "type": "impute", "columns": ["chol"], "values": {"chol": [1, 2]}}),
        "onehot categories not a list": lambda: spec_set(raw, node, ds, {
            "type": "onehot", "columns": ["dx"], "categories": {"dx": "A"}, "other": {"dx": True}}),
        "standardize mean a string": lambda: spec_set(raw, node, ds, {
            "type": "standardize", "columns": ["age"], "mean": {"age": "x"}, "scale": {"age": 1}}),
        "spec without columns": lambda: spec_set(raw, node, ds, {"type": "standardize"}),
        "spec of an absent column": lambda: spec_set(raw, node, ds, {
            "type": "standardize", "columns": ["nope"], "mean": {"nope": 0}, "scale": {"nope": 1}}),
        "spec of another type": lambda: spec_set(raw, node, ds, {"type": "onehot", "columns": ["dx"]},
                                                 preproc_type="standardize"),
        "not a spec": lambda: raw.preproc(node.node_id, ds, "impute", "set", {"transform": [1, 2, 3]}),
        "unknown state": lambda: raw.preproc(node.node_id, ds, "impute", "fit", {"columns": ["age"],
                                                                                 "stats": ["mean"]}, "state-nope"),
        "state of another dataset": lambda: raw.preproc(node.node_id, victim_id, "impute", "fit", {
            "columns": ["age"], "stats": ["mean"]}, cohort_state.state_id),
        "histogram edges not numbers": lambda: raw.fa(node.node_id, ds, stats=["count"], columns=["age"],
                                                      stats_args={"age": {"histogram": {"edges": ["a", "b"]}}}),
        "cov of a string column": lambda: raw.fa(node.node_id, ds, stats=["cov"], columns=["hosp_code", "age"]),
        "mean of a string column": lambda: raw.fa(node.node_id, ds, stats=["mean"], columns=["hosp_code"],
                                                  stats_args={"hosp_code": {"mean": {}}}),
        "crosstab with patient_id": lambda: raw.fa(node.node_id, ds, stats=["crosstab"],
                                                   crosstab=["patient_id", "dx"]),
        "thresholds on a string column": lambda: raw.thresholds(node.node_id, ds, "hosp_code", [1.0]),
    }
    texts: dict[str, str] = {}
    for what, attack in attacks.items():
        reply = attack()
        texts[what] = refusal_text(reply) if isinstance(reply, ErrorReply | FAReply) or fa_part(reply) else ""
    # the victim's file becomes a directory under the running node
    os.remove(victim)
    victim.mkdir()
    (victim / "data.csv").write_text(node.frame.to_csv(index=False))
    texts["CSV replaced by a directory: stats"] = refusal_text(raw.fa(node.node_id, victim_id, stats=["mean"],
                                                                      columns=["age"]))
    texts["CSV replaced by a directory: fit"] = refusal_text(raw.preproc(
        node.node_id, victim_id, "standardize", "fit", {"columns": ["age"], "stats": ["mean"]}))
    assert sum(1 for t in texts.values() if t) >= len(texts) - 4, f"harness: most attacks got no refusal: {texts}"
    assert texts["CSV replaced by a directory: stats"], "harness: stats of a CSV that is a directory succeeded"
    forbidden = secret_strings(node.frame) + sorted({str(tmp_path), os.path.realpath(tmp_path),
                                                     str(node.directory), str(victim), str(node.csv)})
    leaks = {what: [s for s in forbidden if s in text] for what, text in texts.items()}
    leaks = {what: found for what, found in leaks.items() if found}
    assert not leaks, "error replies quote the data or the disk: " + "; ".join(
        f"{what}: {found[:3]} in {texts[what]!r}" for what, found in leaks.items())
    shutil.rmtree(victim)


@pytest.mark.timeout(600)
def test_forty_concurrent_requests_get_one_reply_each_and_the_excess_is_busy(nodes, raw):
    """Attack: 40 fa_requests sent at once (and then 20 preprocessing fits), to pile up work on
    the node. Rule: every request gets exactly one reply; those over max_concurrent (4) are
    ErrorReply "busy" naming disclosure.max_concurrent; the node keeps answering pings, stays
    connected (heartbeats) and answers the next request."""
    node, ds = one_raw_node(nodes, raw)
    heavy = {"dataset_id": ds, "stats": ["count", "mean", "var", "cov"], "columns": ["age", "income", "smoker"]}
    fit = {"dataset_id": ds, "preproc_type": "standardize", "preproc_step": "fit", "preproc_id": "p-burst",
           "preproc_args": {"columns": ["age", "income"], "stats": ["count", "mean", "var"]}}
    for msg_type, content, n in (("fa_request", heavy, 40), ("preproc_request", fit, 20)):
        ids = [raw.send(node.node_id, msg_type, content) for _ in range(n)]
        wait_until(lambda ids=ids: (raw.pump(0.05), all(i in raw.replies for i in ids))[1], 180,
                   f"replies to all {n} {msg_type}s")
        raw.ping(node.node_id)  # handled after the admitted requests: their replies are all in
        counts = {i: len(raw.replies[i]) for i in ids}
        assert all(c == 1 for c in counts.values()), f"requests with more than one reply: {counts}"
        replies = [raw.replies[i][0].content for i in ids]
        busy = [r for r in replies if is_error(r, "busy")]
        others = [r for r in replies if not is_error(r, "busy")]
        assert all(not isinstance(r, ErrorReply) for r in others), f"unexpected errors: {others[:3]}"
        assert busy, f"{n} {msg_type}s at once and none was answered busy"
        assert all("disclosure.max_concurrent" in r.message for r in busy), busy[0].message
        assert others, f"every one of {n} {msg_type}s was answered busy"
    raw.wait_for_heartbeats(node.node_id, more=3)
    after = raw.fa(node.node_id, ds, stats=["count", "mean"], columns=["age"])
    assert isinstance(after, FAReply) and after.numeric["age"].count == 40, after
    assert node.alive()


def test_every_refusal_is_in_the_audit_log(nodes, raw):
    """Attack: a mix of refused requests. Rule: each has its line in DIR/audit.log: a whole-request
    refusal as outcome "refused" with its code, a withheld column under "refused_columns", a busy
    reply as "busy"; the hash chain is intact and no line quotes the data."""
    node, ds = one_raw_node(nodes, raw)
    def sent(msg_type, content):  # one at a time: the burst below is the only one
        msg_id = raw.send(node.node_id, msg_type, content)
        raw.reply(msg_id)
        return msg_id

    whole = {
        sent("preproc_request", {
            "dataset_id": ds, "preproc_type": "onehot", "preproc_step": "set", "preproc_id": "p-a",
            "preproc_args": {"transform": {"type": "onehot", "columns": ["patient_id"],
                                           "categories": {"patient_id": ["X1"]}, "other": {"patient_id": False}}}}),
        sent("preproc_request", {
            "dataset_id": ds, "preproc_type": "onehot", "preproc_step": "set", "preproc_id": "p-b",
            "preproc_args": {"transform": {"type": "onehot", "columns": ["dx"],
                                           "categories": {"dx": [f"c{i}" for i in range(500)]},
                                           "other": {"dx": False}}}}),
    }
    partial = {sent("fa_request", content) for content in (
        {"dataset_id": ds, "stats": ["count", "mean"], "columns": ["chol", "sex", "age"]},
        {"dataset_id": ds, "stats": ["value_counts"], "columns": ["hosp_code", "dx"]},
        {"dataset_id": ds, "stats": ["cov"], "columns": ["sex", "age"]},
    )}
    burst = [raw.send(node.node_id, "fa_request", {"dataset_id": ds, "stats": ["count"], "columns": ["age"]})
             for _ in range(30)]
    for i in burst:
        raw.reply(i)
    busy = {i for i in burst if is_error(raw.replies[i][0].content, "busy")}
    entries = node.wait_for_audit(whole | partial | busy)
    for i in whole:
        reply = raw.replies[i][0].content
        assert is_error(reply, "disclosure_refused"), f"not refused (rules 3 and 7), so not audited as one: {reply}"
        assert entries[i]["outcome"] == "refused" and entries[i]["code"] == "disclosure_refused", entries[i]
    for i in partial:
        reply = raw.replies[i][0].content
        assert isinstance(reply, FAReply), f"harness: the analytics request failed: {reply}"
        assert reply.refused, f"nothing was withheld (chol, sex, hosp_code, cov with sex): {reply}"
        logged = set(entries[i].get("refused_columns", []))
        assert set(reply.refused) <= logged, f"withheld {sorted(reply.refused)}, audited {sorted(logged)}"
    for i in busy:
        assert entries[i]["code"] == "busy" and entries[i]["outcome"] == "refused", entries[i]
    path = Path(node.directory) / AUDIT_FILE
    assert verify(path).ok, verify(path)
    text = path.read_text()
    quoted = [s for s in secret_strings(node.frame) if s in text]
    assert not quoted, f"the audit log quotes data values: {quoted[:5]}"
    assert isinstance(node, Node)
