"""``fedlab.Researcher(..., bulk=...)`` and ``fedlab researcher start --bulk`` with real encrypted nodes.

A researcher binding its own address takes the argument: its bulk port listens where it says
and a large message goes sealed there, or, off, stays on CURVE. Attached to a researcher service
the service's setting is in force (``--bulk``): the kernel's argument is logged as not applied,
and large messages still cross, on the service's bulk port.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from federation import HEARTBEAT, NodeProcess, breast_cancer_splits, free_port, wait_until
from service_helpers import ServiceProcess, private_run_dir

from fedlab import DiscardOnTimeout, Researcher
from fedlab.protocol import PingRequest
from fedlab.transport.keys import create_keypair, read_public_key
from fedlab.transport.service_files import RUN_DIR_ENV

pytestmark = pytest.mark.integration
DEADLINE = 60.0  # a hang guard, not a speed requirement
LARGE = 4 << 20  # over the default 1 MiB bulk threshold


class Keyed:
    """One encrypted node (created, not started) and the researcher's key files that admit it."""

    def __init__(self, root: Path, address: str) -> None:
        public, self.secret = create_keypair(root / "keys", "researcher")
        self.node = NodeProcess.create(root, "site-a", address, frame=breast_cancer_splits(1)[0],
                                       researcher_key=str(public))
        self.allowlist = root / "allowlist.txt"
        self.allowlist.write_text(f"{read_public_key(str(self.node.directory / 'node.key'))} site-a "
                                  f"({self.node.node_id})\n", encoding="utf-8")


@pytest.fixture
def keyed(tmp_path, address, monkeypatch):
    monkeypatch.setenv(RUN_DIR_ENV, str(private_run_dir()))  # no service of another test is found
    for name in ("FEDLAB_KEY", "FEDLAB_ALLOWLIST", "FEDLAB_BULK", "FEDLAB_SERVICE"):
        monkeypatch.delenv(name, raising=False)
    federation = Keyed(tmp_path, address)
    yield federation
    federation.node.stop()


def echo(r: Researcher, node_id: str, size: int) -> None:
    """A ``size``-byte buffer to the node and back, checked byte for byte."""
    payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    req = r.requests.send(PingRequest(echo_buffers=True), [node_id], [DiscardOnTimeout(DEADLINE)],
                          buffers=[payload]).wait()
    assert not req.missing() and not req.errors(), (req.missing(), req.errors())
    (back,) = req.replies()[node_id].buffers
    assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()


def test_an_own_researcher_listens_for_the_bulk_path_where_bulk_says(keyed, address):
    port = free_port()
    with Researcher(address, key=keyed.secret, allowlist=keyed.allowlist, service="own",
                    heartbeat_interval=HEARTBEAT, bulk=f"tcp://127.0.0.1:{port}") as r:
        keyed.node.start()
        bulk = r._transport.bulk
        assert bulk is not None and bulk.port == port
        r.wait_for_nodes(1, timeout=DEADLINE)
        wait_until(lambda: bulk.linked(keyed.node.node_id), DEADLINE, "the node's bulk link")
        echo(r, keyed.node.node_id, LARGE)
        assert (bulk.sealed_out, bulk.sealed_in) == (1, 1)
    assert f"bulk connection to the researcher at 127.0.0.1:{port} up (AES-256-GCM)" in keyed.node.log()


def test_an_own_researcher_with_bulk_off_keeps_everything_on_curve(keyed, address, monkeypatch):
    monkeypatch.setenv("FEDLAB_BULK", f"tcp://127.0.0.1:{free_port()}")  # the argument wins over it
    with Researcher(address, key=keyed.secret, allowlist=keyed.allowlist, service="own",
                    heartbeat_interval=HEARTBEAT, bulk=False) as r:
        keyed.node.start()
        assert r._transport.bulk is None
        r.wait_for_nodes(1, timeout=DEADLINE)
        wait_until(lambda: "the researcher does not offer the bulk path" in keyed.node.log(), DEADLINE,
                   "the node's log line")
        echo(r, keyed.node.node_id, LARGE)
    assert "bulk connection to the researcher" not in keyed.node.log()


@pytest.mark.parametrize("service_bulk", ["off", "port"])
def test_attached_the_services_bulk_setting_is_in_force(keyed, address, service_bulk, caplog):
    caplog.set_level(logging.WARNING, logger="fedlab")
    port = free_port()
    setting = "off" if service_bulk == "off" else f"tcp://127.0.0.1:{port}"
    svc = ServiceProcess(address, "--key", str(keyed.secret), "--allowlist", str(keyed.allowlist),
                         "--bulk", setting)
    try:
        info = svc.wait_listening()
        keyed.node.start()
        asked: bool | str = True if service_bulk == "off" else "off"  # the opposite of the service's
        with Researcher(address, bulk=asked) as r:
            assert r.attached
            assert any(f"bulk={asked!r} is not applied" in m and f"(pid {info.pid})" in m
                       for m in caplog.messages), caplog.messages
            r.wait_for_nodes(1, timeout=DEADLINE)
            if service_bulk == "off":
                wait_until(lambda: "the researcher does not offer the bulk path" in keyed.node.log(), DEADLINE,
                           "the node's log line")
            else:
                wait_until(lambda: f"researcher at 127.0.0.1:{port} up" in keyed.node.log(), DEADLINE,
                           "the node's bulk link to the service's port")
            echo(r, keyed.node.node_id, LARGE)
        log = keyed.node.log()
        assert ("bulk connection to the researcher" in log) == (service_bulk == "port"), log[-3000:]
    finally:
        assert svc.stop() == 0, svc.log()[-3000:]
