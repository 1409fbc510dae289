"""The researcher service's relay and the kernels' client transport, in one process over a real ipc socket.

The nodes are the in-memory twin (``InMemoryResearcherTransport``), so routing is tested without
node processes: each kernel's replies and events reach that kernel only, status changes reach
every kernel, a kernel that closes mid-request has its replies discarded and logged, large
buffers cross through memory files, and a stopped service fails the kernels' next call clearly.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from fedlab.errors import FedlabTransportError
from fedlab.protocol import ErrorReply, PingReply, PingRequest, make_envelope
from fedlab.researcher.policies import DiscardOnTimeout
from fedlab.researcher.requests import Requests
from fedlab.training.messages import TrainProgress  # an Event: progress of a request, not its end
from fedlab.transport import InMemoryResearcherTransport
from fedlab.transport.service_client import ServiceClientTransport
from fedlab.transport.service_files import ServiceInfo
from fedlab.transport.service_relay import ServiceRelay


class Nodes(InMemoryResearcherTransport):
    """The in-memory twin with what the relay reads of a ZmqResearcherTransport."""

    address = "tcp://127.0.0.1:1"
    key = None
    allowlist = None
    heartbeat_interval = 0.2


def echo(name: str, ticks: int = 0):
    def handle(envelope):
        events = [make_envelope(TrainProgress(experiment_id="x", round=1, phase="training", iteration=i), name,
                                parent_id=envelope.msg_id) for i in range(ticks)]
        return [*events, make_envelope(PingReply(node_name=name, n_buffers=len(envelope.buffers)), name,
                                       parent_id=envelope.msg_id, buffers=envelope.buffers)]
    return handle


@pytest.fixture
def service(tmp_path):
    nodes = Nodes()
    nodes.add_node("node-a", "a", echo("a", ticks=2))
    nodes.add_node("node-b", "b", echo("b"), delay=0.3)
    endpoint = f"ipc://{tmp_path}/s.sock"
    relay = ServiceRelay(nodes, endpoint)
    relay.start()
    info = ServiceInfo(pid=0, uid=0, address=nodes.address, endpoint=endpoint, started=relay.started,
                       researcher_id=nodes.researcher_id)
    kernels: list[ServiceClientTransport] = []

    def attach() -> tuple[ServiceClientTransport, Requests]:
        client = ServiceClientTransport(info)
        requests = Requests(client, default_timeout=10)
        client.start(requests.on_message)
        kernels.append(client)
        return client, requests

    yield relay, nodes, attach
    for client in kernels:
        client.close()
    relay.stop()


def test_each_kernel_gets_its_own_replies_and_events(service):
    relay, nodes, attach = service
    (one, r1), (_two, r2) = attach(), attach()
    assert sorted(r.node_id for r in one.nodes()) == ["node-a", "node-b"]  # known at once, from the welcome
    events: dict[str, list[int]] = {"one": [], "two": []}
    results: dict[str, list] = {}

    def run(name, requests):
        got = []
        for _ in range(10):
            req = requests.send(PingRequest(), policies=[DiscardOnTimeout(10)],
                                on_event=lambda node, env, n=name: events[n].append(env.content.iteration)).wait()
            got.append((sorted(req.replies()), req.missing()))
            for env in req.replies().values():
                assert env.header.sender in ("a", "b")
        results[name] = got

    threads = [threading.Thread(target=run, args=(n, r)) for n, r in (("one", r1), ("two", r2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for name in ("one", "two"):
        assert results[name] == [(["node-a", "node-b"], {})] * 10
        assert events[name] == [0, 1] * 10  # node a's two events per request, to the kernel that asked only
    assert relay.discarded == 0 and len(relay.routes) == 0


def test_status_changes_reach_every_kernel(service):
    relay, nodes, attach = service
    (one, _), (two, _) = attach(), attach()
    heard: list[tuple[str, str]] = []
    two.directory.add_listener(lambda node, status: heard.append((node, status)))
    nodes.kill("node-b")
    deadline = time.monotonic() + 5
    while ("node-b", "offline") not in heard and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ("node-b", "offline") in heard
    assert {r.node_id: r.status for r in one.nodes()}["node-b"] == "offline"
    nodes.revive("node-b")
    deadline = time.monotonic() + 5
    while {r.node_id: r.status for r in two.nodes()}["node-b"] != "online" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert {r.node_id: r.status for r in two.nodes()}["node-b"] == "online"


def test_a_kernel_that_leaves_mid_request_has_its_replies_discarded_and_logged(service, caplog):
    relay, nodes, attach = service
    (gone, r_gone), (_stays, r_stays) = attach(), attach()
    caplog.set_level(logging.INFO, logger="fedlab.service")
    r_gone.send(PingRequest(), nodes=["node-b"])  # node b answers after 0.3 s
    deadline = time.monotonic() + 5
    while not relay.routes.in_flight(gone.kernel_id) and time.monotonic() < deadline:
        time.sleep(0.005)
    gone.close()
    req = r_stays.send(PingRequest(), nodes=["node-b"], policies=[DiscardOnTimeout(10)]).wait()
    assert sorted(req.replies()) == ["node-b"]
    deadline = time.monotonic() + 5
    while relay.discarded == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert relay.discarded == 1
    assert "dropped its 1 request(s) in flight (ping_request to node-b)" in caplog.text
    assert f"of kernel {gone.kernel_id}, which has gone" in caplog.text


def test_large_buffers_cross_through_memory_files_both_ways(service):
    relay, nodes, attach = service
    client, requests = attach()
    payload = bytes(range(256)) * 4096  # 1 MiB
    req = requests.send(PingRequest(), nodes=["node-a"], buffers=[payload], policies=[DiscardOnTimeout(10)]).wait()
    (reply,) = req.replies().values()
    assert [bytes(b) for b in reply.buffers] == [payload]
    assert client._lender is not None and client._lender.copied >= len(payload)  # sent by file, not socket
    kernel = next(iter(relay.kernels.values()))
    assert kernel.lender is not None and kernel.lender.copied >= len(payload)  # and came back by file


def test_a_send_the_service_cannot_make_is_reported_to_the_kernel(service):
    relay, nodes, attach = service
    client, requests = attach()
    failures: list[str] = []
    envelope = make_envelope(PingRequest(), client.researcher_id)
    client.send("node-nowhere", envelope, on_failure=failures.append)
    deadline = time.monotonic() + 5
    while not failures and time.monotonic() < deadline:
        time.sleep(0.01)
    assert failures == ["not connected"]
    assert len(relay.routes) == 0


def test_a_stopped_service_fails_the_kernels_next_call_and_its_pending_requests(service):
    relay, nodes, attach = service
    client, requests = attach()
    nodes.set_delay("node-a", 5.0)
    pending = requests.send(PingRequest(), nodes=["node-a"], policies=[DiscardOnTimeout(30)])
    relay.stop()
    started = time.monotonic()
    pending.wait()
    assert time.monotonic() - started < 10  # ended by the service going away, not by its 30 s timeout
    assert pending.missing()["node-a"].reason == "disconnected"
    with pytest.raises(FedlabTransportError, match="stopped .*fedlab researcher start"):
        client.nodes()
    with pytest.raises(FedlabTransportError):
        requests.send(PingRequest())


def test_error_replies_are_routed_like_replies(service):
    relay, nodes, attach = service
    nodes.add_node("node-c", "c", lambda env: make_envelope(ErrorReply(code="refused", message="no", node="c"), "c",
                                                            parent_id=env.msg_id))
    client, requests = attach()
    deadline = time.monotonic() + 5
    while "node-c" not in {r.node_id for r in client.nodes()} and time.monotonic() < deadline:
        time.sleep(0.01)
    req = requests.send(PingRequest(), nodes=["node-c"], policies=[DiscardOnTimeout(10)]).wait()
    assert req.errors()["node-c"].code == "refused"
