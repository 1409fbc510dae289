"""The node's side of secure aggregation, driven by hand-written envelopes over real node.db files.

Three in-process dispatchers (real node directories, real SQLite) run whole sessions: the secure
sum of their analytics figures equals the plain sum; each step is stored, so a dispatcher made
afresh over the same directory (a restart) resumes the session and still refuses what it refused;
and the node's own rules (force/refuse, one masked vector, one unmasking split, session ids used
once, majority threshold, minimum nodes) hold whatever the messages say.
"""

from __future__ import annotations

from fractions import Fraction

import msgspec
import numpy as np
import pandas as pd
import pytest

from fedlab.analytics.messages import FAReply, FARequest, FASecure
from fedlab.node.config import init_node_dir
from fedlab.node.dispatch import Dispatcher
from fedlab.node.registry import DatasetRegistry
from fedlab.protocol import ErrorReply, make_envelope
from fedlab.protocol.secagg_messages import (
    SecaggInput,
    SecaggKeys,
    SecaggKeysReply,
    SecaggKeysRequest,
    SecaggShareReply,
    SecaggShareRequest,
    SecaggUnmaskReply,
    SecaggUnmaskRequest,
)
from fedlab.secagg.fa_layout import layout_of
from fedlab.secagg.fixed_point import decode_exact_sum
from fedlab.secagg.server_session import ServerSession

RESEARCHER = "researcher-1"


class Site:
    """A node directory and a dispatcher over it; ``restart()`` makes a new dispatcher (same node.db)."""

    def __init__(self, tmp_path, name: str, frame: pd.DataFrame, **options) -> None:
        self.config = init_node_dir(tmp_path / name, name)
        self.registry = DatasetRegistry(self.config.db_path)
        csv = tmp_path / f"{name}.csv"
        frame.to_csv(csv, index=False)
        self.dataset_id = self.registry.add("data", ["t"], "csv", csv).dataset_id
        self.options = options
        self.restart()

    def restart(self) -> None:
        self.dispatcher = Dispatcher(self.config.node_id, self.config.name, self.registry, **self.options)

    @property
    def id(self) -> str:
        return self.config.node_id

    def ask(self, content):
        return self.dispatcher.handle(make_envelope(content, RESEARCHER)).content


def frame(seed: int, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"x": rng.normal(1e6, 3, n), "g": rng.choice(["a", "b"], n)})


@pytest.fixture
def sites(tmp_path):
    return [Site(tmp_path, f"site-{i}", frame(i, 40 + 10 * i)) for i in range(3)]


def request(site: Site, secure: FASecure | None) -> FARequest:
    return FARequest(dataset_id=site.dataset_id, stats=["count", "sum", "mean", "var", "value_counts"],
                     columns=["x", "g"], secagg=secure)


def setup(sites, session_id="s-1", threshold=2):
    ids = [s.id for s in sites]
    server = ServerSession(session_id, ids, threshold)
    for site in sites:
        reply = site.ask(SecaggKeysRequest(session_id=session_id, nodes=ids, threshold=threshold, purpose="analytics"))
        assert isinstance(reply, SecaggKeysReply), reply
        server.add_keys(site.id, reply.keys.c_pk, reply.keys.s_pk)
    keys = {n: SecaggKeys(c_pk=c, s_pk=s) for n, (c, s) in server.keys().items()}
    for site in sites:
        reply = site.ask(SecaggShareRequest(session_id=session_id, keys=keys))
        assert isinstance(reply, SecaggShareReply), reply
        server.add_shares(site.id, dict(reply.blobs))
    return server


def masked_round(sites, server, session_id="s-1"):
    skeletons = {s.id: s.ask(request(s, FASecure(phase="layout"))) for s in sites}
    layout = layout_of(skeletons)
    encoded = msgspec.msgpack.encode(layout)
    replies = {}
    for site in sites:
        secure = FASecure(phase="masked", layout=encoded,
                          input=SecaggInput(session_id=session_id, blobs=server.blobs_for(site.id)))
        replies[site.id] = site.ask(request(site, secure))
    return layout, replies


def test_a_restarted_node_resumes_its_session_and_the_sum_is_exact(sites):
    server = setup(sites)
    for site in sites:
        site.restart()  # everything the session needs is in node.db
    _, replies = masked_round(sites, server)
    assert all(isinstance(r, FAReply) and r.masked for r in replies.values()), replies
    total = sum(np.frombuffer(r.masked, np.uint64) for r in replies.values())
    ids = [s.id for s in sites]
    answers = {}
    for site in sites:
        site.restart()
        reply = site.ask(SecaggUnmaskRequest(session_id="s-1", survivors=ids))
        assert isinstance(reply, SecaggUnmaskReply), reply
        answers[site.id] = {v: (s.kind, s.x, int.from_bytes(s.y, "big")) for v, s in reply.shares.items()}
    sums = decode_exact_sum(server.unmask(total.copy(), ids, [], answers), total.size // 8)
    plain = [s.ask(request(s, None)) for s in sites]
    expected_count = sum(p.numeric["x"].count for p in plain)
    expected_sum = sum(Fraction(p.numeric["x"].sum) for p in plain)
    assert expected_count in sums and expected_sum in sums  # exact: the count and the sum of the nodes' sums


def test_a_second_masked_input_and_a_second_split_are_refused_after_a_restart(sites):
    server = setup(sites)
    layout, _ = masked_round(sites, server)
    a = sites[0]
    a.restart()
    again = a.ask(request(a, FASecure(phase="masked", layout=msgspec.msgpack.encode(layout),
                                      input=SecaggInput(session_id="s-1", blobs=server.blobs_for(a.id)))))
    assert isinstance(again, ErrorReply) and again.code == "secagg_refused", again
    ids = [s.id for s in sites]
    first = a.ask(SecaggUnmaskRequest(session_id="s-1", survivors=ids[:2], dropped=ids[2:]))
    assert isinstance(first, SecaggUnmaskReply)
    a.restart()
    same = a.ask(SecaggUnmaskRequest(session_id="s-1", survivors=ids[:2], dropped=ids[2:]))
    assert isinstance(same, SecaggUnmaskReply) and same.shares == first.shares
    other = a.ask(SecaggUnmaskRequest(session_id="s-1", survivors=ids, dropped=[]))
    assert isinstance(other, ErrorReply) and other.code == "secagg_refused", other


def test_session_rules_hold_whatever_the_messages_say(sites, tmp_path):
    a = sites[0]
    ids = [s.id for s in sites]
    ok = a.ask(SecaggKeysRequest(session_id="once", nodes=ids, threshold=2, purpose="analytics"))
    assert isinstance(ok, SecaggKeysReply)
    for bad, words in [
        (SecaggKeysRequest(session_id="once", nodes=ids, threshold=2, purpose="analytics"), "already started"),
        (SecaggKeysRequest(session_id="not-me", nodes=ids[1:], threshold=2, purpose="analytics"), None),
        (SecaggKeysRequest(session_id="p", nodes=ids, threshold=2, purpose="gossip"), "purpose"),
        (SecaggUnmaskRequest(session_id="never", survivors=ids), "no secure aggregation session"),
    ]:
        reply = a.ask(bad)
        assert isinstance(reply, ErrorReply) and reply.code == "secagg_refused", (bad, reply)
        if words:
            assert words in reply.message
    four = [*ids, "node-extra"]  # 2 of 4 is no majority
    minority = a.ask(SecaggKeysRequest(session_id="m2", nodes=four, threshold=2, purpose="analytics"))
    assert isinstance(minority, ErrorReply) and "majority" in minority.message.lower(), minority
    # a session for analytics cannot be used for a training round
    setup(sites, "for-fa")
    train_like = a.ask(SecaggUnmaskRequest(session_id="for-fa", survivors=ids))
    assert isinstance(train_like, ErrorReply)  # not masked yet: nothing to unmask


def test_force_and_refuse_are_the_nodes_own_settings(tmp_path):
    forced = Site(tmp_path, "forced", frame(0, 40), force_secure_aggregation=True)
    reply = forced.ask(request(forced, None))
    assert isinstance(reply, ErrorReply) and reply.code == "secagg_refused"
    assert "force_secure_aggregation = true" in reply.message
    layout = forced.ask(request(forced, FASecure(phase="layout")))
    assert isinstance(layout, FAReply)
    off = Site(tmp_path, "off", frame(1, 40), secure_aggregation=False)
    for content in (request(off, FASecure(phase="layout")),
                    SecaggKeysRequest(session_id="x", nodes=[off.id, "other"], threshold=2)):
        reply = off.ask(content)
        assert isinstance(reply, ErrorReply) and "secure_aggregation = false" in reply.message
    assert isinstance(off.ask(request(off, None)), FAReply)
    few = Site(tmp_path, "few", frame(2, 40), secure_aggregation_min_nodes=3)
    reply = few.ask(SecaggKeysRequest(session_id="y", nodes=[few.id, "other"], threshold=2))
    assert isinstance(reply, ErrorReply) and "at least 3 nodes" in reply.message
