"""Hostile input against a real node process and a real Researcher: >= 10,000 malformed messages each.

The node test plays a hostile researcher (a ROUTER socket the real `fedlab node start` process
dials); the researcher test plays a hostile node (a DEALER dialling a real Researcher's ROUTER)
next to a real node. Afterwards each side must be alive, its memory bounded, its audit trail
(node) complete and intact, and real requests must still get correct answers.

Messages go in batches; after each batch a real ping is the barrier: its reply proves the
receiver read everything before it, so no message is lost to a full queue and the count sent
is the count received.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import zmq
from federation import HEARTBEAT, NodeProcess, breast_cancer_splits, wait_until
from hostile import Hostile, envelope_frames, header_frame, rss_kib

import fedlab.preprocessing.messages  # noqa: F401 - registers preproc_request
from fedlab import DiscardOnTimeout, Researcher
from fedlab.analytics.messages import FAReply, FARequest
from fedlab.node.audit import AUDIT_FILE, verify
from fedlab.node.registry import DatasetRegistry
from fedlab.protocol import (
    Bye,
    DecodeError,
    Heartbeat,
    PingReply,
    PingRequest,
    decode,
)
from fedlab.researcher.policies import PENDING
from fedlab.training.messages import TrainingPlanStatusRequest, TrainRequest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

N_MESSAGES = 10_000
WARM_UP = 1_000
BATCH = 250
MAX_BYTES = 200_000
RSS_GROWTH_KIB = 100 * 1024
PLAN = "class P:\n    pass\n"


def node_templates(dataset_id: str) -> dict[str, dict]:
    """Valid content of every type a node accepts: mutations of these reach its handlers."""
    return {
        "ping_request": {"echo_buffers": True},
        "dataset_search_request": {"tags": ["breast-cancer"]},
        "dataset_list_request": {},
        "fa_request": {"dataset_id": dataset_id, "stats": ["count", "mean"], "columns": ["mean radius"],
                       "stats_args": {"mean area": {"histogram": {"edges": [0, 500, 1000, 3000]}}}},
        "preproc_request": {"dataset_id": dataset_id, "preproc_type": "standardize", "preproc_step": "fit",
                            "preproc_id": "p-1", "preproc_args": {"columns": ["mean radius"]}},
        "training_plan_status_request": {"plan_source": PLAN, "plan_class": "P"},
        "training_plan_approve_request": {"plan_source": PLAN, "plan_class": "P", "description": "fuzz"},
        "train_request": {"experiment_id": "e-1", "round": 1, "dataset_id": dataset_id, "plan_source": PLAN,
                          "plan_class": "P", "params": []},
        "train_cancel_request": {"request_id": "r-1"},
        "heartbeat": {"name": "hostile", "state": "online", "interval": HEARTBEAT},
        "bye": {"reason": "fuzz"},
    }


def expected_refusal(frames: list[bytes]) -> bool | None:
    """True if the node refuses these frames before dispatch, False if it dispatches them,
    None if it reads them silently (a heartbeat or goodbye)."""
    try:
        env = decode(frames, max_bytes=MAX_BYTES)
    except DecodeError:
        return True
    return None if env.msg_type in ("heartbeat", "bye") else False


class HostileResearcher:
    """A ROUTER socket playing the researcher; it reads (and counts) what the node sends back."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.bind(address)
        self.node = b""
        self.replies: list = []
        self.last_beat = 0.0

    def poll(self, timeout_ms: int) -> None:
        """Read what has arrived (up to ``timeout_ms`` for the first), beating like a researcher."""
        if time.monotonic() - self.last_beat > HEARTBEAT / 2 and self.node:
            self.sock.send_multipart([self.node, *envelope_frames(
                Heartbeat(name="hostile", interval=HEARTBEAT), "hostile")])
            self.last_beat = time.monotonic()
        while self.sock.poll(timeout_ms):
            timeout_ms = 0
            identity, *frames = self.sock.recv_multipart()
            self.node = identity
            env = decode(frames)
            if env.msg_type not in ("heartbeat", "bye"):
                self.replies.append(env)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart([self.node, *frames])

    def request(self, content, msg_id: str, timeout: float = 30.0):
        """Send a valid request and wait for its reply (resent every 5 s: a barrier, not a race)."""
        deadline = time.monotonic() + timeout
        sent = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() - sent > 10:  # replies queue behind slow handlers; resend only if lost
                self.send(envelope_frames(content, "hostile", msg_id=msg_id))
                sent = time.monotonic()
            self.poll(50)
            for env in self.replies:
                if env.parent_id == msg_id:
                    return env
        raise AssertionError(f"no reply to {msg_id} within {timeout} s")

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def audit_lines(node: NodeProcess) -> list[dict]:
    path = node.directory / AUDIT_FILE
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def test_node_survives_10000_hostile_messages(tmp_path, address):
    frame = breast_cancer_splits(2)[0]
    hostile = HostileResearcher(address)
    node = NodeProcess.create(tmp_path, "hospital-a", address, frame=frame)
    config = node.directory / "config.toml"
    config.write_text("\n".join(f"max_message_bytes = {MAX_BYTES}" if line.startswith("max_message_bytes")
                                else line for line in config.read_text().splitlines()) + "\n")
    dataset_id = DatasetRegistry(node.directory / "node.db").list()[0].dataset_id
    node.start()
    try:
        wait_until(lambda: hostile.poll(50) or hostile.node, 30, "the node's first heartbeat")
        # warm up: torch is loaded at the first training message; a train request answers after it
        reply = hostile.request(TrainingPlanStatusRequest(plan_source=PLAN, plan_class="P"), "warm-1", timeout=120)
        assert reply.msg_type == "training_plan_status_reply", reply
        reply = hostile.request(TrainRequest(experiment_id="e", round=1, dataset_id=dataset_id, plan_source=PLAN,
                                             plan_class="P", params=[]), "warm-2", timeout=120)
        assert reply.content.code == "not_approved", reply  # answered on the training thread, after torch
        gen = Hostile(1234, node_templates(dataset_id), max_bytes=MAX_BYTES, parents=lambda: ["warm-1"],
                      costly=frozenset({"preproc_request"}))
        dispatched = refused = 0
        baseline = 0
        for i in range(WARM_UP + N_MESSAGES):
            if i == WARM_UP:
                hostile.request(PingRequest(), "baseline")
                baseline = rss_kib(node.proc.pid)
            frames = gen()
            outcome = expected_refusal(frames)
            dispatched += outcome is False
            refused += outcome is True
            hostile.send(frames)
            if i % BATCH == BATCH - 1:
                assert node.proc.poll() is None, f"node died after {i + 1} messages:\n{node.log()[-3000:]}"
                ping = hostile.request(PingRequest(), f"barrier-{i}")
                assert isinstance(ping.content, PingReply)
                hostile.replies.clear()
            else:
                hostile.poll(0)

        # alive, memory bounded, still answering real requests correctly
        assert node.proc.poll() is None
        hostile.request(PingRequest(), "after")
        growth = rss_kib(node.proc.pid) - baseline
        print(f"node RSS baseline {baseline / 1024:.1f} MiB, growth over {N_MESSAGES} messages "
              f"{growth / 1024:.1f} MiB; {dispatched} dispatched, {refused} refused before dispatch")
        assert growth < RSS_GROWTH_KIB, f"node RSS grew by {growth} KiB"
        ping = hostile.request(PingRequest(), "final-ping")
        assert isinstance(ping.content, PingReply) and ping.content.node_name == "hospital-a"
        stats = hostile.request(FARequest(dataset_id=dataset_id, stats=["count", "mean"], columns=["mean radius"]),
                                "final-stats")
        assert isinstance(stats.content, FAReply), stats.content
        partial = stats.content.numeric["mean radius"]
        assert partial.count == len(frame)
        assert partial.mean == pytest.approx(frame["mean radius"].mean(), rel=1e-12)

        # every message left exactly one audit line, and the chain is intact
        own = {"warm-1", "warm-2", "baseline", "after", "final-ping", "final-stats"}

        def counts() -> tuple[int, int]:
            lines = audit_lines(node)
            before = sum("frames" in e["asked"] for e in lines)
            hostile_handled = sum("frames" not in e["asked"] and e["msg_id"] not in own
                                  and not e["msg_id"].startswith("barrier-") for e in lines)
            return before, hostile_handled

        try:
            wait_until(lambda: counts() == (refused, dispatched), 30, "one audit line per message")
        finally:
            print("audit lines (refused before dispatch, hostile handled):", counts(), "expected:",
                  (refused, dispatched))
        handled = [e for e in audit_lines(node) if "frames" not in e["asked"]]
        assert verify(node.directory / AUDIT_FILE).ok
        codes = pd.Series([e.get("code", "ok") for e in handled]).value_counts()
        print("node replies by code:", codes.to_dict())
        assert "internal_error" not in codes, [e for e in handled if e.get("code") == "internal_error"][:3]
        cli = subprocess.run([sys.executable, "-m", "fedlab", "node", "audit", str(node.directory), "--verify"],
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0 and "hash chain intact" in cli.stdout, cli.stderr
        assert "Traceback" not in node.log()
    finally:
        node.stop()
        hostile.close()



# -- the researcher's side --------------------------------------------------------------------

def researcher_templates() -> dict[str, dict]:
    """Valid content of what a node sends: replies, events, heartbeats (a goodbye is left out,
    since it would rightly mark the hostile node offline and end the request it must answer)."""
    return {
        "ping_reply": {"node_name": "hostile-node", "n_buffers": 0},
        "fa_reply": {"dataset_id": "d", "n_rows": 3, "numeric": {"x": {"count": 3, "missing": 0, "sum": 3.0,
                                                                      "mean": 1.0, "m2": 0.0}}},
        "dataset_search_reply": {"datasets": []},
        "error_reply": {"code": "dataset_error", "message": "forged"},
        "train_progress": {"experiment_id": "e", "round": 1, "phase": "training"},
        "heartbeat": {"name": "hostile-node", "state": "online", "interval": HEARTBEAT},
    }


class HostileNode:
    """A DEALER socket dialling the researcher as node ``hostile-node``."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, b"hostile-node")
        self.sock.connect(address)
        self.received: list = []
        self.last_beat = 0.0

    def poll(self, timeout_ms: int) -> None:
        if time.monotonic() - self.last_beat > 0.3:
            self.send(envelope_frames(Heartbeat(name="hostile-node", interval=1.0), "hostile-node"))
            self.last_beat = time.monotonic()
        while self.sock.poll(timeout_ms):
            timeout_ms = 0
            env = decode(self.sock.recv_multipart())
            if env.msg_type != "heartbeat":
                self.received.append(env)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def barrier(self, name: str, timeout: float = 60.0) -> None:
        """An unknown message type with a known id: the researcher's error reply proves it read
        everything sent before it."""
        deadline, sent = time.monotonic() + timeout, 0.0
        while time.monotonic() < deadline:
            if time.monotonic() - sent > 10:
                self.send([header_frame("barrier", msg_id=name, sender="hostile-node"), b"\x80"])
                sent = time.monotonic()
            self.poll(50)
            if any(env.parent_id == name for env in self.received):
                self.received = [env for env in self.received if env.parent_id != name]
                return
        raise AssertionError(f"the researcher did not answer barrier {name} within {timeout} s")

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


class RealTraffic(threading.Thread):
    """Real analytics requests to the real node while the hostile node sends its junk: each asks
    for another column, so a reply delivered to the wrong request would show."""

    def __init__(self, researcher: Researcher, node_id: str, dataset_id: str, frame: pd.DataFrame) -> None:
        super().__init__(name="real-traffic", daemon=True)
        self.researcher, self.node_id, self.dataset_id, self.frame = researcher, node_id, dataset_id, frame
        self.stop = threading.Event()
        self.msg_ids: list[str] = []
        self.done = 0
        self.failures: list[str] = []

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")

    def _run(self) -> None:
        columns = [c for c in self.frame.columns if c != "target"]
        while not self.stop.is_set():
            column = columns[self.done % len(columns)]
            request = self.researcher.requests.send(
                FARequest(dataset_id=self.dataset_id, stats=["count", "mean"], columns=[column]),
                nodes=[self.node_id], policies=[DiscardOnTimeout(60)])
            if self.node_id in request.msg_ids:
                self.msg_ids.append(request.msg_ids[self.node_id])
            with request:
                reply = request.replies().get(self.node_id)
                ok = (reply is not None and isinstance(reply.content, FAReply)
                      and list(reply.content.numeric) == [column]
                      and reply.content.numeric[column].count == len(self.frame)
                      and reply.content.numeric[column].mean == pytest.approx(self.frame[column].mean(), rel=1e-12))
            if not ok:
                self.failures.append(f"{column}: {reply}, {request.errors()}, {request.missing()}")
            self.done += 1


def test_researcher_survives_10000_hostile_messages(tmp_path, address, caplog):
    # the researcher logs each refusal at WARNING; pytest would keep 10,000 records in memory and
    # blur the memory figure, so only errors are captured here
    caplog.set_level("ERROR", logger="fedlab")
    frame = breast_cancer_splits(2)[0]
    # default 1 s heartbeats here: the 0.2 s other tests use for speed leaves a 0.6 s liveness
    # window, which a 2-core machine busy with this flood (and its neighbours) cannot promise
    node = NodeProcess.create(tmp_path, "hospital-a", address, frame=frame, heartbeat=1.0)
    dataset_id = DatasetRegistry(node.directory / "node.db").list()[0].dataset_id
    researcher = Researcher(address, heartbeat_interval=1.0, max_message_bytes=MAX_BYTES)
    hostile = HostileNode(address)
    traffic = None
    try:
        node.start()
        researcher.wait_for_nodes(1, timeout=30)
        wait_until(lambda: hostile.poll(20) or "hostile-node" in researcher.online_node_ids(), 30,
                   "the hostile node to be online")
        real_id = node.node_id
        pending = researcher.requests.send(PingRequest(), nodes=["hostile-node"], policies=[DiscardOnTimeout(280)])
        pending_id = pending.msg_ids["hostile-node"]
        traffic = RealTraffic(researcher, real_id, dataset_id, frame)
        traffic.start()
        # forged replies name the real node's requests; the hostile node's own pending one is kept
        # for its one genuine answer at the end
        gen = Hostile(4321, researcher_templates(), max_bytes=MAX_BYTES, parents=lambda: traffic.msg_ids[-5:],
                      sender="hostile-node")
        baseline = 0
        sent = 0
        while sent < WARM_UP + N_MESSAGES:
            if sent == WARM_UP:
                hostile.barrier("baseline")
                baseline = rss_kib(os.getpid())
            frames = gen()
            try:
                if isinstance(decode(frames, max_bytes=MAX_BYTES).content, Bye):
                    continue
            except DecodeError:
                pass
            hostile.send(frames)
            sent += 1
            if sent % BATCH == 0:
                hostile.barrier(f"barrier-{sent}")
                assert researcher._transport._thread.is_alive(), "the researcher's io thread died"
            else:
                hostile.poll(0)
        hostile.barrier("after")
        traffic.stop.set()
        traffic.join(90)
        growth = rss_kib(os.getpid()) - baseline
        print(f"researcher (test process) RSS growth over {N_MESSAGES} messages {growth / 1024:.1f} MiB; "
              f"{traffic.done} real requests answered meanwhile")
        assert researcher._transport._thread.is_alive()
        assert not traffic.is_alive() and traffic.done > 0 and not traffic.failures, traffic.failures[:3]
        assert growth < RSS_GROWTH_KIB, f"RSS grew by {growth} KiB"

        # the hostile node's request is still pending, untouched by 10,000 junk and forged messages
        # (replies() would wait for the outcome, so look at the request's progress itself). The one
        # exception is the protocol's own: a valid heartbeat of the flood with a new ``session`` says
        # the hostile node restarted, which ends its pending request as "restarted"; then a fresh
        # request must work.
        progress = pending._progress["hostile-node"]
        assert progress.status == PENDING or (progress.status == "missing" and progress.reason == "restarted"), \
            pending._progress
        if progress.status != PENDING:
            with pending:  # ended already: forget it
                pass
            pending = researcher.requests.send(PingRequest(), nodes=["hostile-node"],
                                               policies=[DiscardOnTimeout(60)])
            pending_id = pending.msg_ids["hostile-node"]
        deadline = time.monotonic() + 30
        while not [env for env in hostile.received if env.msg_id == pending_id] and time.monotonic() < deadline:
            hostile.poll(100)
        asked = [env for env in hostile.received if env.msg_id == pending_id]
        assert asked and isinstance(asked[0].content, PingRequest)
        hostile.send(envelope_frames(PingReply(node_name="genuine"), "hostile-node", parent_id=pending_id))
        pending.wait()
        assert pending.replies()["hostile-node"].content == PingReply(node_name="genuine")

        # and the real node still works with this researcher
        fds = researcher.search(["breast-cancer"], nodes=[real_id])
        result = researcher.stats(fds, ["count", "mean", "std"], columns=["mean radius", "mean area"])
        table = result.global_stats()
        for column in ("mean radius", "mean area"):
            assert table.loc[column, "count"] == len(frame)
            assert table.loc[column, "mean"] == pytest.approx(frame[column].mean(), rel=1e-9)
            assert table.loc[column, "std"] == pytest.approx(frame[column].std(), rel=1e-9)
        with researcher.ping([real_id]) as ping:
            assert isinstance(ping.replies()[real_id].content, PingReply)
        assert researcher.requests.pending_count() == 0
    finally:
        if traffic is not None:
            traffic.stop.set()
        hostile.close()
        researcher.close()
        node.stop()
