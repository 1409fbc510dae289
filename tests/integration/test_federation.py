"""A real federation: `fedlab node start` processes on loopback, a Researcher, real sockets."""

from __future__ import annotations

import signal
import time

import pytest
from federation import HEARTBEAT, NodeProcess, breast_cancer_splits, wait_until

from fedlab import DiscardOnTimeout, FedlabDataQualityError, FedlabDatasetError, Researcher, StopOnTimeout
from fedlab.protocol import PingRequest

pytestmark = pytest.mark.integration


def status_of(researcher: Researcher, node_id: str) -> str | None:
    frame = researcher.nodes()
    rows = frame[frame.node_id == node_id]
    return None if rows.empty else rows.iloc[0]["status"]


def test_three_nodes_found_by_tag(make_nodes, address):
    nodes = [n.start() for n in make_nodes(3)]
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
        r.wait_for_nodes(3, timeout=30)
        fds = r.search(["breast-cancer"])
        assert sorted(fds.node_ids()) == sorted(n.node_id for n in nodes)
        data = fds.data()
        assert sum(d["shape"][0] for d in data.values()) == 569
        assert all(d["columns"][-1] == "target" and d["data_type"] == "csv" for d in data.values())
        assert all("path" not in d for d in data.values())
        assert list(fds.to_frame().columns)[:2] == ["node_id", "node"]
        # A heartbeat sent while a node was still answering says "busy" until the next one says "online".
        wait_until(lambda: set(r.nodes().status) == {"online"}, 20 * HEARTBEAT, "every node to show online")
        assert sorted(r.nodes().name) == ["hospital-a", "hospital-b", "hospital-c"]
        listing = r.list_datasets()
        assert len(listing) == 3 and "path" not in listing.columns
        with pytest.raises(FedlabDatasetError, match="no node holds a dataset tagged"):
            r.search(["no-such-tag"])


def test_killed_node_goes_offline_then_comes_back(make_nodes, address):
    a, b = (n.start() for n in make_nodes(2))
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
        r.wait_for_nodes(2, timeout=30)
        b.kill()
        t0 = time.monotonic()
        wait_until(lambda: status_of(r, b.node_id) == "offline", 10 * HEARTBEAT, "the killed node to show offline")
        assert time.monotonic() - t0 <= 5 * HEARTBEAT
        assert status_of(r, a.node_id) == "online"
        b.start()
        wait_until(lambda: status_of(r, b.node_id) == "online", 30, "the restarted node to show online")
        assert len(r.search(["breast-cancer"])) == 2


def test_discard_on_timeout_returns_answering_nodes_on_time(make_nodes, address):
    nodes = [n.start() for n in make_nodes(3, heartbeat=1.0)]
    with Researcher(address, heartbeat_interval=1.0) as r:
        r.wait_for_nodes(3, timeout=30)
        nodes[2].signal(signal.SIGSTOP)  # frozen: connected, but silent
        try:
            t0 = time.monotonic()
            req = r.requests.send(PingRequest(), policies=[DiscardOnTimeout(0.5)]).wait()
            elapsed = time.monotonic() - t0
        finally:
            nodes[2].signal(signal.SIGCONT)
        assert sorted(req.replies()) == sorted(n.node_id for n in nodes[:2])
        assert req.missing()[nodes[2].node_id].reason == "timeout"
        assert 0.5 <= elapsed < 0.5 + 0.15


def test_stop_on_timeout_with_real_nodes(make_nodes, address):
    nodes = [n.start() for n in make_nodes(2, heartbeat=1.0)]
    with Researcher(address, heartbeat_interval=1.0) as r:
        r.wait_for_nodes(2, timeout=30)
        nodes[1].signal(signal.SIGSTOP)
        try:
            req = r.requests.send(PingRequest(), policies=[StopOnTimeout(0.3)]).wait()
        finally:
            nodes[1].signal(signal.SIGCONT)
        assert req.stopped and list(req.replies()) == [nodes[0].node_id]


def test_researcher_restart_gets_its_nodes_back(make_nodes, address):
    nodes = [n.start() for n in make_nodes(2)]
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
        r.wait_for_nodes(2, timeout=30)
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r2:
        r2.wait_for_nodes(2, timeout=10)
        assert len(r2.search(["breast-cancer"])) == 2
    assert all(n.proc.poll() is None for n in nodes)  # never restarted


def test_node_started_before_researcher_connects_when_it_appears(make_nodes, address):
    (node,) = make_nodes(1)
    node.start()
    wait_until(lambda: "dialing researcher" in node.log(), 30, "the node to start")
    time.sleep(3 * HEARTBEAT)
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
        r.wait_for_nodes(1, timeout=10)
        assert r.ping().replies()[node.node_id].content.node_name == "hospital-a"


def test_node_stops_cleanly_on_signals(make_nodes, address):
    a, b = make_nodes(2)
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
        a.start()
        b.start()
        r.wait_for_nodes(2, timeout=30)
        for node, signum in ((a, signal.SIGINT), (b, signal.SIGTERM)):
            t0 = time.monotonic()
            node.signal(signum)
            assert node.proc.wait(5) == 0
            assert time.monotonic() - t0 < 2.0
            assert "stopped" in (node.directory / "node.log").read_text()
            # a clean stop says goodbye: offline at once, without waiting for heartbeats to lapse
            wait_until(lambda n=node: status_of(r, n.node_id) == "offline", 2 * HEARTBEAT, "the goodbye")


def test_data_quality_check_names_nodes_and_columns(tmp_path, address):
    parts = breast_cancer_splits(2)
    a = NodeProcess.create(tmp_path, "site-a", address, frame=parts[0]).start()
    b = NodeProcess.create(tmp_path, "site-b", address,
                           frame=parts[1].rename(columns={"mean radius": "radius"})).start()
    try:
        with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
            r.wait_for_nodes(2, timeout=30)
            with pytest.raises(FedlabDataQualityError) as info:
                r.search(["breast-cancer"])
            message = str(info.value)
            assert "mean radius" in message and "radius" in message
            assert a.node_id in message and b.node_id in message
    finally:
        a.stop()
        b.stop()


def test_node_notices_a_vanished_researcher_and_rejoins_a_new_one(make_nodes, address):
    import subprocess
    import sys

    (node,) = make_nodes(1)
    node.start()
    script = ("import sys, time\nfrom fedlab import Researcher\n"
              f"r = Researcher({address!r}, heartbeat_interval={HEARTBEAT})\n"
              "r.wait_for_nodes(1, timeout=30)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    researcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert researcher.stdout.readline().strip() == "ready"
        wait_until(lambda: "connected to researcher" in node.log(), 10, "the node to hear the researcher")
        researcher.kill()  # no goodbye: the node must notice the lost connection by itself
        researcher.wait(5)
        wait_until(lambda: "connection to researcher" in node.log() and "lost" in node.log(), 10,
                   "the node to notice the lost connection")
    finally:
        researcher.kill()
        researcher.wait(5)
        researcher.stdout.close()
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
        r.wait_for_nodes(1, timeout=10)
        assert node.node_id in r.ping().replies()


def test_second_researcher_on_a_taken_address_gets_a_clear_error(address):
    from fedlab import FedlabTransportError

    with Researcher(address, heartbeat_interval=HEARTBEAT):
        with pytest.raises(FedlabTransportError, match="cannot listen on .* another researcher"):
            Researcher(address)
