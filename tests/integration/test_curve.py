"""Encrypted, authenticated federations: real `fedlab node start` processes and a keyed Researcher.

Each point of the security design is one test here: keyed nodes and a keyed researcher work;
a node whose key is not in the allowlist, or that was given another researcher's key, is
refused with a log line on both sides and never receives a message; insecure mode says so
loudly; a zmq program that does not speak CURVE (or has no allowed key) is never heard.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import pytest
import zmq
from federation import HEARTBEAT, NodeProcess, breast_cancer_splits, wait_until

from fedlab import DiscardOnTimeout, Researcher
from fedlab.protocol import Heartbeat, PingRequest, encode, make_envelope
from fedlab.transport.keys import create_keypair, load_keypair, read_public_key

pytestmark = pytest.mark.integration
DEADLINE = 30.0  # a hang guard, not a speed requirement
# zmq reports a mechanism mismatch on the side that notices it first; the other may get "no detail"
PLAIN_REFUSED = re.compile(r"refused a node that connects without encryption|refused a connection whose handshake "
                           r"failed \(no detail\): a node without encryption \(--insecure\)")


@pytest.fixture
def researcher_keys(tmp_path: Path) -> tuple[Path, Path]:
    """The researcher's (public, secret) key files, as `fedlab keygen` writes them."""
    return create_keypair(tmp_path / "keys", "researcher")


@pytest.fixture
def nodes(tmp_path: Path, address: str):
    """make(name, researcher_key=..., frame=...) -> a created (not started) node; all stopped at the end."""
    created: list[NodeProcess] = []
    frames = iter(breast_cancer_splits(3))

    def make(name: str, researcher_key: str | None) -> NodeProcess:
        node = NodeProcess.create(tmp_path, name, address, frame=next(frames), researcher_key=researcher_key)
        created.append(node)
        return node

    yield make
    for node in created:
        node.stop()


@pytest.fixture
def fedlab_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="fedlab")
    return caplog


def node_key(node: NodeProcess) -> str:
    return read_public_key(str(node.directory / "node.key"))


def write_allowlist(path: Path, *allowed: NodeProcess) -> Path:
    lines = ["# nodes this researcher accepts"] + [f"{node_key(n)} {n.directory.name} ({n.node_id})" for n in allowed]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def listed(researcher: Researcher) -> set[str]:
    return set(researcher.nodes().node_id)


def test_keyed_nodes_and_researcher_answer_ping_and_stats(nodes, address, researcher_keys, tmp_path):
    public, secret = researcher_keys
    a, b = nodes("hospital-a", str(public)), nodes("hospital-b", read_public_key(str(public)))  # file, or the key
    allowlist = write_allowlist(tmp_path / "allowlist.txt", a, b)
    a.start(), b.start()
    with Researcher(address, heartbeat_interval=HEARTBEAT, key=secret, allowlist=allowlist) as r:
        assert r.public_key == load_keypair(secret).public
        r.wait_for_nodes(2, timeout=DEADLINE)
        ping = r.ping()
        assert sorted(ping.replies()) == sorted([a.node_id, b.node_id])
        fds = r.search(["breast-cancer"])
        result = r.stats(fds, ["count", "mean"], columns=["mean radius"])
        pooled = breast_cancer_splits(3)
        expected = [frame["mean radius"] for frame in pooled[:2]]
        row = result.global_stats().loc["mean radius"]
        assert row["count"] == sum(len(e) for e in expected)
        assert row["mean"] == pytest.approx(sum(e.sum() for e in expected) / row["count"], rel=1e-9)
    for node in (a, b):
        assert "encrypted, researcher key" in node.log()
        assert "INSECURE" not in node.log()
        audit = [json.loads(line) for line in (node.directory / "audit.log").read_text().splitlines()]
        assert audit and all(e["peer"] == f"researcher key {r.public_key}" for e in audit), audit  # who asked


def test_unknown_node_key_is_refused_on_both_sides_until_allowlisted(nodes, address, researcher_keys, tmp_path,
                                                                      fedlab_log):
    public, secret = researcher_keys
    a, stranger = nodes("hospital-a", str(public)), nodes("stranger", str(public))
    allowlist = write_allowlist(tmp_path / "allowlist.txt", a)
    a.start(), stranger.start()
    with Researcher(address, heartbeat_interval=HEARTBEAT, key=secret, allowlist=allowlist) as r:
        r.wait_for_nodes(1, timeout=DEADLINE)
        line = (f"refused a node connecting from 127.0.0.1: its public key {node_key(stranger)} is not in the "
                f"allowlist {allowlist.resolve()}; add it if you trust this node")
        wait_until(lambda: line in fedlab_log.text, DEADLINE, "the researcher's refusal line")
        wait_until(lambda: "refused this node's key: it is not in the researcher's allowlist" in stranger.log(),
                   DEADLINE, "the refused node's log line")
        # nothing the stranger sends is read, and nothing reaches it
        ping = r.requests.send(PingRequest(), policies=[DiscardOnTimeout(2)]).wait()
        assert list(ping.replies()) == [a.node_id]
        assert stranger.node_id not in listed(r)
        assert "connected to researcher" not in stranger.log()

        # the researcher admits it by adding its line: no restart on either side
        write_allowlist(allowlist, a, stranger)
        wait_until(lambda: stranger.node_id in r.online_node_ids(), DEADLINE, "the newly allowed node")
        assert sorted(r.ping().replies()) == sorted([a.node_id, stranger.node_id])
    assert "connected to researcher" in stranger.log()


def test_node_with_another_researchers_key_is_refused_on_both_sides(nodes, address, researcher_keys, tmp_path,
                                                                     fedlab_log):
    _, secret = researcher_keys
    other_public, _ = create_keypair(tmp_path / "other", "researcher")
    misled = nodes("misled", str(other_public))
    allowlist = write_allowlist(tmp_path / "allowlist.txt", misled)  # even an allowed node key does not help
    misled.start()
    with Researcher(address, heartbeat_interval=HEARTBEAT, key=secret, allowlist=allowlist) as r:
        wait_until(lambda: "could not be decrypted: it was given a different researcher public key" in fedlab_log.text,
                   DEADLINE, "the researcher's refusal line")
        wait_until(lambda: "has a different key than config.toml's researcher_public_key" in misled.log(),
                   DEADLINE, "the node's refusal line")
        assert misled.node_id not in listed(r)
        assert r.online_node_ids() == []
    assert "connected to researcher" not in misled.log()


def test_insecure_mode_works_and_warns_loudly(nodes, address, fedlab_log):
    demo = nodes("demo-site", None).start()  # init_node_dir without a key: an insecure node
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
        r.wait_for_nodes(1, timeout=DEADLINE)
        assert list(r.ping().replies()) == [demo.node_id]
    warnings = [rec.getMessage() for rec in fedlab_log.records if rec.levelno == logging.WARNING]
    assert any(m.startswith("INSECURE: researcher at") and "no encryption and no authentication" in m
               for m in warnings)
    stderr = demo.log()
    assert "WARNING" in stderr and "INSECURE: this node talks to the researcher with no encryption or " \
        "authentication" in stderr and "For local demos only" in stderr
    assert "INSECURE: this node" in (demo.directory / "node.log").read_text()
    assert "insecure = true" in (demo.directory / "config.toml").read_text()
    audit = [json.loads(line) for line in (demo.directory / "audit.log").read_text().splitlines()]
    assert audit and all(e["peer"] == "unauthenticated (insecure mode)" for e in audit), audit


def test_insecure_node_cannot_join_a_keyed_researcher(nodes, address, researcher_keys, tmp_path, fedlab_log):
    _, secret = researcher_keys
    demo = nodes("demo-site", None).start()
    allowlist = write_allowlist(tmp_path / "allowlist.txt")
    with Researcher(address, heartbeat_interval=HEARTBEAT, key=secret, allowlist=allowlist) as r:
        wait_until(lambda: PLAIN_REFUSED.search(fedlab_log.text), DEADLINE,
                   "the researcher's refusal line")
        wait_until(lambda: "requires encrypted, authenticated nodes but this node is insecure" in demo.log(),
                   DEADLINE, "the node's refusal line")
        assert r.online_node_ids() == []
    assert "connected to researcher" not in demo.log()


def _knock(address: str, sock_setup, seconds: float) -> None:
    """A hand-made zmq DEALER that sends well-formed fedlab heartbeats for ``seconds``."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"node-intruder")
    sock_setup(sock)
    sock.connect(address)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            beat = make_envelope(Heartbeat(name="intruder", state="online", interval=HEARTBEAT), "node-intruder")
            try:
                sock.send_multipart(encode(beat), zmq.NOBLOCK)
            except zmq.Again:
                pass
            time.sleep(0.05)
    finally:
        sock.close(0)
        ctx.term()


def test_raw_zmq_peers_without_an_allowed_key_are_never_heard(address, researcher_keys, tmp_path, fedlab_log):
    public, secret = researcher_keys
    allowlist = write_allowlist(tmp_path / "allowlist.txt")
    unlisted = load_keypair(create_keypair(tmp_path / "intruder", "intruder")[1])

    def curve(sock: zmq.Socket) -> None:  # speaks CURVE, knows the researcher's key, but is not listed
        sock.curve_secretkey = unlisted.secret.encode()
        sock.curve_publickey = unlisted.public.encode()
        sock.curve_serverkey = read_public_key(str(public)).encode()

    with Researcher(address, heartbeat_interval=HEARTBEAT, key=secret, allowlist=allowlist) as r:
        _knock(address, lambda sock: None, 1.0)  # plain, non-CURVE zmq
        wait_until(lambda: PLAIN_REFUSED.search(fedlab_log.text), DEADLINE,
                   "the refusal of the plain peer")
        _knock(address, curve, 1.0)
        wait_until(lambda: f"its public key {unlisted.public} is not in the allowlist" in fedlab_log.text,
                   DEADLINE, "the refusal of the unlisted CURVE peer")
        assert r.nodes().empty


def test_an_admitted_node_cannot_pass_itself_off_as_another(nodes, address, researcher_keys, tmp_path, fedlab_log):
    public, secret = researcher_keys
    a, impostor = nodes("hospital-a", str(public)), nodes("impostor", str(public))
    allowlist = write_allowlist(tmp_path / "allowlist.txt", a, impostor)  # each key bound to its node id
    config = impostor.directory / "config.toml"
    config.write_text(config.read_text().replace(impostor.node_id, a.node_id))  # now claims a's id
    impostor.start()
    with Researcher(address, heartbeat_interval=HEARTBEAT, key=secret, allowlist=allowlist) as r:
        line = (f"dropped a message: key {node_key(impostor)} is allowed as node {impostor.node_id} but claims "
                f"to be node {a.node_id}")
        wait_until(lambda: line in fedlab_log.text, DEADLINE, "the researcher's impersonation line")
        assert r.nodes().empty


def test_keyed_node_never_talks_to_a_researcher_without_a_key(nodes, address, researcher_keys, fedlab_log):
    public, _ = researcher_keys
    node = nodes("hospital-a", str(public)).start()
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r:  # insecure: anyone could have started it
        wait_until(lambda: "does not use encryption (it was started without a key)" in node.log(), DEADLINE,
                   "the node's refusal line")
        wait_until(lambda: re.search(r"refused a node that connects with encryption|refused a connection whose "
                                     r"handshake failed", fedlab_log.text), DEADLINE, "the researcher's line")
        assert r.nodes().empty
    assert "connected to researcher" not in node.log()
