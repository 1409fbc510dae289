"""Training across hosts: the researcher and each node in a network namespace of its own.

The test builds a small network with ``ip``: a hub namespace holding a bridge, and one
namespace per host (the researcher, three nodes), each joined to the bridge by a veth pair
and given an address on 10.213.0.0/24. The researcher is ``netns_researcher.py`` run with
``ip netns exec``; the nodes are ``fedlab node start`` in theirs, so every message crosses a
real link (no loopback). Mid-round, the test takes one node's port on the bridge down, as a
cut cable would: the round ends by the experiment's disconnect policy, which names that node,
while the other two finish; with the port back up the node reconnects by itself and trains in
the next round.

Creating namespaces needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN; where the machine does
not allow it the test is skipped with a message naming what was missing. Namespaces (and with
them every veth and the bridge) are deleted at the end, also when the test fails.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from federation import NodeProcess

pytest.importorskip("torch")

from slow_plan import TAGS, cancer_sites  # noqa: E402

pytestmark = pytest.mark.integration

SUBNET = "10.213.0"
RESEARCHER_IP = f"{SUBNET}.1"
PORT = 5555  # the researcher's namespace is empty: any port is free there
NODE_HEARTBEAT = 0.5
MODEL_ARGS = {"n_features": 30, "step_seconds": 0.4}
ARGS = {"batch_size": 32, "num_updates": 8, "optimizer_args": {"lr": 0.05}, "seed": 2}
SCRIPT = Path(__file__).with_name("netns_researcher.py")
HOW = "run the tests as root with CAP_SYS_ADMIN and CAP_NET_ADMIN (e.g. docker run --cap-add SYS_ADMIN " \
      "--cap-add NET_ADMIN) to include it"


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)


def must(*args: str) -> None:
    done = ip(*args)
    if done.returncode != 0:
        raise AssertionError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def netns_missing(ip_command: str = "ip") -> str | None:
    """Why this machine cannot run the test (None if it can): what was tried and what it said."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux; this is {sys.platform}"
    if os.geteuid() != 0:
        return f"creating network namespaces needs root; the tests run as uid {os.geteuid()}"
    if shutil.which(ip_command) is None:
        return f"the `{ip_command}` command (iproute2) is not installed"
    probe = f"flprobe{os.getpid()}"
    done = subprocess.run([ip_command, "netns", "add", probe], capture_output=True, text=True, timeout=30,
                          check=False)
    if done.returncode != 0:
        return f"`ip netns add` failed: {done.stderr.strip() or f'exit status {done.returncode}'}"
    try:
        done = subprocess.run([ip_command, "netns", "exec", probe, "true"], capture_output=True, text=True,
                              timeout=30, check=False)
        if done.returncode != 0:
            return f"`ip netns exec` failed: {done.stderr.strip() or f'exit status {done.returncode}'}"
        for what, args in (("bring a namespace's loopback up", ["link", "set", "lo", "up"]),
                           ("create a veth pair", ["link", "add", "p0", "type", "veth", "peer", "name", "p1"]),
                           ("create a bridge", ["link", "add", "br0", "type", "bridge"])):
            done = subprocess.run([ip_command, "-n", probe, *args], capture_output=True, text=True, timeout=30,
                                  check=False)
            if done.returncode != 0:
                return f"cannot {what}: `ip -n NS {' '.join(args)}` said {done.stderr.strip()!r}"
    finally:
        subprocess.run([ip_command, "netns", "del", probe], capture_output=True, timeout=30, check=False)
    return None


class Network:
    """A hub namespace with a bridge, and hosts joined to it; ``close`` deletes it all."""

    def __init__(self) -> None:
        self.prefix = f"fl{os.getpid()}"
        self.hub = f"{self.prefix}-hub"
        self.namespaces: list[str] = []
        self._add_namespace(self.hub)
        must("-n", self.hub, "link", "add", "br0", "type", "bridge")
        must("-n", self.hub, "link", "set", "br0", "up")

    def _add_namespace(self, name: str) -> None:
        must("netns", "add", name)
        self.namespaces.append(name)  # from here on, close() deletes it
        must("-n", name, "link", "set", "lo", "up")

    def host(self, name: str, address: str) -> str:
        """A namespace ``PREFIX-name`` whose eth0 (``address``/24) is plugged into the bridge at port ``name``."""
        ns = f"{self.prefix}-{name}"
        self._add_namespace(ns)
        must("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", name, "netns", self.hub)
        must("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        must("-n", ns, "link", "set", "eth0", "up")
        must("-n", self.hub, "link", "set", name, "master", "br0")
        must("-n", self.hub, "link", "set", name, "up")
        return ns

    def port(self, name: str, state: str) -> None:
        """Take the bridge port of host ``name`` down (the cable is cut) or up again."""
        must("-n", self.hub, "link", "set", name, state)

    def close(self) -> list[str]:
        """Delete every namespace (their veths and the bridge go with them); return what failed."""
        failed = []
        for ns in reversed(self.namespaces):
            done = ip("netns", "del", ns)
            if done.returncode != 0:
                failed.append(f"{ns}: {done.stderr.strip()}")
        return failed


@pytest.fixture
def network():
    why = netns_missing()
    if why is not None:
        pytest.skip(f"no network namespaces on this machine: {why}; {HOW}")
    net = Network()
    try:
        yield net
    finally:
        leftovers = net.close()
        assert not leftovers, f"could not delete namespaces: {leftovers}"


class Lines:
    """The researcher script's JSON lines, read on a thread so that every wait has a deadline."""

    def __init__(self, proc: subprocess.Popen[str], stderr: Path) -> None:
        self._queue: queue.Queue[dict | None] = queue.Queue()
        self._proc, self._stderr = proc, stderr
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._queue.put(json.loads(line))
        self._queue.put(None)

    def expect(self, event: str, timeout: float) -> dict:
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {event!r} from the researcher within {timeout} s") from None
        if item is None or item["event"] != event:
            self._proc.wait(10)
            raise AssertionError(f"expected {event!r} from the researcher, got {item} (exit {self._proc.returncode})"
                                 f"\n{self._stderr.read_text()[-4000:]}")
        return item

    def close(self) -> None:
        """Once the script has ended: let the reader reach the end of its output, close the pipes."""
        self._reader.join(10)
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                pipe.close()


def test_netns_probe_names_what_is_missing():
    if os.geteuid() == 0 and sys.platform.startswith("linux"):
        assert netns_missing("/nonexistent/ip") == "the `/nonexistent/ip` command (iproute2) is not installed"
    else:
        assert netns_missing() is not None


@pytest.mark.timeout(400)
def test_a_node_whose_link_is_cut_mid_round_is_dropped_by_policy_and_rejoins(tmp_path, network, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # node processes inherit it: one torch thread each
    address = f"tcp://{RESEARCHER_IP}:{PORT}"
    researcher_ns = network.host("r", RESEARCHER_IP)
    nodes: list[NodeProcess] = []
    researcher, lines = None, None
    try:
        for i, frame in enumerate(cancer_sites(3)):
            node = NodeProcess.create(tmp_path, f"site-{chr(97 + i)}", address, frame=frame, tags=TAGS,
                                      heartbeat=NODE_HEARTBEAT)
            config = node.directory / "config.toml"
            config.write_text(config.read_text().replace("require_approval = true", "require_approval = false"))
            node.launcher = ("ip", "netns", "exec", network.host(f"n{i}", f"{SUBNET}.{10 + i}"))
            nodes.append(node.start())
        target = nodes[2]
        stderr = tmp_path / "researcher-stderr.txt"
        with open(stderr, "w") as err:
            researcher = subprocess.Popen(
                ["ip", "netns", "exec", researcher_ns, sys.executable, str(SCRIPT), "--address", address,
                 "--nodes", "3", "--target", target.node_id, "--model-args", json.dumps(MODEL_ARGS),
                 "--training-args", json.dumps(ARGS)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=dict(os.environ))
        lines = Lines(researcher, stderr)

        assert lines.expect("online", 120)["nodes"] == sorted(n.node_id for n in nodes)
        first = lines.expect("round", 240)["rows"]  # the nodes' first round imports torch: slow
        assert [r["status"] for r in first] == ["ok"] * 3, first
        assert lines.expect("training", 120)["node"] == target.node_id
        network.port("n2", "down")
        second = {r["node_id"]: r for r in lines.expect("round", 120)["rows"]}
        assert [second[n.node_id]["status"] for n in nodes[:2]] == ["ok", "ok"], second
        cut = second[target.node_id]
        assert (cut["status"], cut["node"]) == ("missing", "site-c"), cut
        assert cut["reason"].startswith("disconnected:") and "DiscardOnDisconnect" in cut["reason"], cut
        assert target.proc is not None and target.proc.poll() is None  # the node itself never stopped

        network.port("n2", "up")
        assert researcher.stdin is not None
        researcher.stdin.write("link-up\n")
        researcher.stdin.flush()
        assert lines.expect("rejoined", 120)["node"] == target.node_id
        third = {r["node_id"]: r for r in lines.expect("round", 240)["rows"]}
        assert [third[n.node_id]["status"] for n in nodes] == ["ok"] * 3, third
        assert third[target.node_id]["n_samples"] == len(cancer_sites(3)[2])
        assert researcher.wait(30) == 0, stderr.read_text()[-4000:]
    finally:
        if researcher is not None and researcher.poll() is None:
            researcher.kill()
            researcher.wait(10)
        if lines is not None:
            lines.close()
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        for node in nodes:
            node.stop()
