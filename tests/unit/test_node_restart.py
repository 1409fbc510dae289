"""A node restarted under the same id: the directory tells listeners, pending requests stop waiting.

A new node process announces a new ``session`` in its heartbeats; whatever the old process had
been asked is lost with it, so a request still waiting for it marks it missing as "restarted"
at once instead of waiting out its timeout (or the disconnect grace, which a quick restart
never reaches).
"""

from __future__ import annotations

import threading

from fedlab.protocol import Heartbeat, PingReply, PingRequest, decode, encode, make_envelope
from fedlab.researcher import DiscardOnDisconnect, DiscardOnTimeout, Requests
from fedlab.transport import InMemoryResearcherTransport
from fedlab.transport.directory import RESTARTED, NodeDirectory


def pong(node_id):
    return lambda env: make_envelope(PingReply(node_name=node_id), node_id, parent_id=env.msg_id)


def test_a_heartbeat_carries_its_process_session():
    beat = make_envelope(Heartbeat(name="site-a", interval=0.5, session="3f2a91c07be4"), "node-1")
    assert decode(encode(beat)).content.session == "3f2a91c07be4"
    assert Heartbeat(name="site-a").session == ""  # a node that does not say


def test_the_directory_tells_listeners_when_a_node_process_changes():
    directory = NodeDirectory()
    events: list[tuple[str, str]] = []
    directory.add_listener(lambda n, s: events.append((n, s)))
    directory.seen("n1", "one", "online", interval=0.1, session="p1")
    directory.seen("n1", "one", "busy", interval=0.1, session="p1")
    directory.seen("n1", "one", "busy", interval=0.1, session="p2")  # restarted, and busy again at once
    directory.offline("n1")
    directory.seen("n1", "one", "online", interval=0.1, session="p3")  # down, then a new process
    directory.seen("n1")  # a message that is not a heartbeat: no session, no change
    assert events == [("n1", "online"), ("n1", "busy"), ("n1", RESTARTED), ("n1", "offline"),
                      ("n1", RESTARTED), ("n1", "online")]
    assert directory.get("n1").session == "p3" and directory.get("n1").status == "online"


def test_nodes_that_never_say_their_session_are_never_taken_for_restarted():
    directory = NodeDirectory()
    events: list[tuple[str, str]] = []
    directory.add_listener(lambda n, s: events.append((n, s)))
    directory.seen("n1", "one")
    directory.offline("n1")
    directory.seen("n1", "one")
    assert RESTARTED not in [s for _, s in events]


def test_a_request_stops_waiting_for_a_node_that_restarted():
    transport = InMemoryResearcherTransport(researcher_id="researcher-test")
    requests = Requests(transport, default_timeout=30.0)
    transport.start(requests.on_message)
    try:
        transport.add_node("a", "a", pong("a"))
        transport.add_node("slow", "slow", pong("slow"), delay=20.0)
        transport.directory.seen("slow", "slow", session="p1")
        restart = threading.Timer(0.2, transport.directory.seen, args=("slow", "slow"),
                                  kwargs={"session": "p2"})
        restart.start()
        request = requests.send(PingRequest(), policies=[DiscardOnTimeout(30), DiscardOnDisconnect(10)]).wait()
        restart.join()
        assert list(request.replies()) == ["a"]
        missing = request.missing()["slow"]
        assert missing.reason == "restarted" and "restarted while the request was pending" in missing.detail
        assert requests.pending_count() == 0
    finally:
        transport.close()
