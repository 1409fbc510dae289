"""The sealed bulk path with real encrypted `fedlab node start` processes: same answers as plain.

An encrypted researcher offers each encrypted node a bulk session over CURVE; the node dials the
researcher's bulk port and large messages (here, with a threshold of 0, every message but the
transport's own) travel sealed with AES-256-GCM. Statistics and a training round must come out
exactly as over a plain federation with the same data; with the default threshold only the
large echo takes the bulk path; with the path off on either side everything stays on CURVE.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from federation import HEARTBEAT, NodeProcess, breast_cancer_splits, free_port, wait_until
from plan_sources import LOGREG_PLAN

from fedlab import DiscardOnTimeout, Experiment, Researcher
from fedlab.protocol import PingRequest
from fedlab.transport import ZmqResearcherTransport
from fedlab.transport.keys import Allowlist, create_keypair, load_keypair, read_public_key

pytestmark = pytest.mark.integration
DEADLINE = 60.0  # a hang guard, not a speed requirement
ARGS = {"epochs": 1, "batch_size": 32, "optimizer_args": {"lr": 0.1}, "seed": 3}


def keyed_researcher(address: str, secret: Path, allowlist: Path, **bulk) -> Researcher:
    """A keyed researcher whose bulk port is a free one (the default, control port + 1, may be taken)."""
    bulk.setdefault("bulk", f"tcp://127.0.0.1:{free_port()}")
    transport = ZmqResearcherTransport(address, heartbeat_interval=HEARTBEAT, key=load_keypair(secret),
                                       allowlist=Allowlist(allowlist), **bulk)
    return Researcher(address, transport=transport)


def make_federation(root: Path, address: str, *, keyed: bool, n: int = 2, bulk_transfer: bool = True):
    """n started nodes on the breast cancer splits, training allowed; with keyed, the researcher's key files."""
    root.mkdir(parents=True, exist_ok=True)
    public = secret = allowlist = None
    if keyed:
        public, secret = create_keypair(root / "keys", "researcher")
    nodes = []
    for i, frame in enumerate(breast_cancer_splits(n)):
        node = NodeProcess.create(root, f"site-{chr(97 + i)}", address, frame=frame,
                                  researcher_key=str(public) if public else None)
        config = node.directory / "config.toml"
        text = config.read_text().replace("require_approval = true", "require_approval = false")
        if not bulk_transfer:  # a top-level key: before the first table
            text = text.replace("\n[disclosure]", "\nbulk_transfer = false\n\n[disclosure]", 1)
        config.write_text(text)
        nodes.append(node)
    if keyed:
        allowlist = root / "allowlist.txt"
        allowlist.write_text("".join(f"{read_public_key(str(n.directory / 'node.key'))} {n.directory.name} "
                                     f"({n.node_id})\n" for n in nodes))
    for node in nodes:
        node.start()
    return nodes, secret, allowlist


@pytest.fixture
def stopped():
    """Nodes to stop at the end, in any case."""
    nodes: list[NodeProcess] = []
    yield nodes
    for node in nodes:
        node.stop()


@pytest.fixture(autouse=True)
def one_thread_per_node(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def stats_and_one_round(r: Researcher, n: int):
    r.wait_for_nodes(n, timeout=DEADLINE)
    fds = r.search(["breast-cancer"])
    stats = r.stats(fds, ["count", "mean", "std"], columns=["mean radius", "mean texture"]).global_stats()
    exp = Experiment(r, ["breast-cancer"], LOGREG_PLAN, plan_class="LogReg", model_args={"n_features": 30},
                     training_args=ARGS, rounds=1, round_timeout=DEADLINE)
    history = exp.run()
    assert (history["status"] == "ok").all(), history
    return stats, {k: np.asarray(v).copy() for k, v in exp.params.items()}, history


def test_stats_and_a_training_round_over_the_bulk_path_give_what_plain_gives(tmp_path, stopped):
    pytest.importorskip("torch")
    plain_address = f"tcp://127.0.0.1:{free_port()}"
    nodes, _, _ = make_federation(tmp_path / "plain", plain_address, keyed=False)
    stopped += nodes
    with Researcher(plain_address, heartbeat_interval=HEARTBEAT) as r:
        plain_stats, plain_params, plain_history = stats_and_one_round(r, 2)
    for node in nodes:
        node.stop()

    address = f"tcp://127.0.0.1:{free_port()}"
    nodes, secret, allowlist = make_federation(tmp_path / "keyed", address, keyed=True)
    stopped += nodes
    with keyed_researcher(address, secret, allowlist, bulk_threshold=0) as r:  # every message sealed
        bulk = r._transport.bulk
        r.wait_for_nodes(2, timeout=DEADLINE)
        wait_until(lambda: all(bulk.linked(n.node_id) for n in nodes), DEADLINE, "both nodes' bulk links")
        sealed_before = (bulk.sealed_out, bulk.sealed_in)
        stats, params, history = stats_and_one_round(r, 2)
        sealed = (bulk.sealed_out - sealed_before[0], bulk.sealed_in - sealed_before[1])
    # search, stats, plan check, training and validation: each a request to both nodes and a reply back
    assert sealed[0] >= 8 and sealed[1] >= 8, sealed
    assert stats.equals(plain_stats), (stats, plain_stats)
    assert sorted(params) == sorted(plain_params)
    for name, value in params.items():
        np.testing.assert_allclose(value, plain_params[name], rtol=1e-6, atol=1e-7)
    assert sorted(history["n_samples"]) == sorted(plain_history["n_samples"])
    for node in nodes:
        log = node.log()
        assert "bulk connection to the researcher at 127.0.0.1:" in log and "up (AES-256-GCM)" in log, log[-3000:]
        for trouble in ("dropped message", "lost message", "refused a message", "refused a record", "cut off"):
            assert trouble not in log, log[-3000:]


def echo(r: Researcher, node_ids: list[str], size: int, seed: int = 0) -> None:
    payload = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    req = r.requests.send(PingRequest(echo_buffers=True), node_ids, [DiscardOnTimeout(DEADLINE)],
                          buffers=[payload]).wait()
    assert not req.missing() and not req.errors(), (req.missing(), req.errors())
    for env in req.replies().values():
        (back,) = env.buffers
        assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()


def test_with_the_default_threshold_only_large_messages_are_sealed(tmp_path, stopped, address):
    nodes, secret, allowlist = make_federation(tmp_path, address, keyed=True, n=1)
    stopped += nodes
    with keyed_researcher(address, secret, allowlist) as r:
        bulk = r._transport.bulk
        r.wait_for_nodes(1, timeout=DEADLINE)
        wait_until(lambda: bulk.linked(nodes[0].node_id), DEADLINE, "the node's bulk link")
        echo(r, [nodes[0].node_id], 8 << 20)
        assert (bulk.sealed_out, bulk.sealed_in) == (1, 1)
        echo(r, [nodes[0].node_id], 1000)  # small: over CURVE
        assert list(r.ping().replies()) == [nodes[0].node_id]
        assert (bulk.sealed_out, bulk.sealed_in) == (1, 1)


@pytest.mark.parametrize("off", ["researcher", "node"])
def test_with_the_bulk_path_off_on_either_side_everything_stays_on_curve(tmp_path, stopped, address, off, caplog):
    caplog.set_level(logging.INFO, logger="fedlab")
    nodes, secret, allowlist = make_federation(tmp_path, address, keyed=True, n=1, bulk_transfer=off != "node")
    stopped += nodes
    with keyed_researcher(address, secret, allowlist, **({"bulk": False} if off == "researcher" else {})) as r:
        r.wait_for_nodes(1, timeout=DEADLINE)
        if off == "researcher":
            assert r._transport.bulk is None
            wait_until(lambda: "the researcher does not offer the bulk path" in nodes[0].log(), DEADLINE,
                       "the node's log line")
        echo(r, [nodes[0].node_id], 4 << 20)
        if off == "node":
            assert (r._transport.bulk.sealed_out, r._transport.bulk.sealed_in) == (0, 0)
            assert not r._transport.bulk.linked(nodes[0].node_id)
    assert "bulk connection to the researcher" not in nodes[0].log()
