"""The researcher service with real processes: `fedlab researcher start`, `fedlab node start` and kernels.

Kernels are separate Python processes attached to one service. Two of them run statistics at
the same time and each gets its own figures; one killed in the middle of a training round leaves
the other's requests running, the nodes online, and the round's replies discarded (and logged);
a new process attaches and sees the nodes online at once, without them reconnecting. A second
service for the same port is refused by name, and a service file left by a killed service is
found out and removed. (Who may attach: test_service_access.py.)
"""

from __future__ import annotations

import json
import signal
import time

import pandas as pd
import pytest
from federation import NodeProcess, wait_until
from service_helpers import ServiceProcess, cli, client, private_run_dir

from fedlab import Researcher
from fedlab.errors import FedlabTransportError
from fedlab.transport.service_files import RUN_DIR_ENV, find_service, service_paths

pytest.importorskip("sklearn")
pytestmark = pytest.mark.integration

TAGS = ("cancer",)

STATS_CLIENT = r"""
import json, os, sys, time
import fedlab
address, column, n, out, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]

def dump(data, path):  # whole or not at all: the test reads it while this kernel works
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)

with fedlab.Researcher(address, service="attach") as r:
    at_attach = sorted(r.online_node_ids())  # before any wait: what the service told it on attaching
    r.wait_for_nodes(n, timeout=60)
    fds = r.search(["cancer"])
    results, times = [], []
    while not os.path.exists(stop) or len(results) < 3:
        t0 = time.time()
        table = r.stats(fds, ["count", "mean"], columns=[column], timeout=60).global_stats()
        results.append([list(table.index), float(table.loc[column, "count"]), float(table.loc[column, "mean"])])
        times.append([t0, time.time()])
        dump({"results": results, "times": times}, out + ".partial")
    nodes = r.nodes()
    dump({"id": r.id, "at_attach": at_attach, "results": results, "times": times,
          "status": dict(zip(nodes["node_id"], nodes["status"]))}, out)
"""

TRAIN_CLIENT = r"""
import sys
import fedlab
from slow_plan import SlowLogReg
address, n, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def on_progress(node_id, event):
    if event.phase == "training":
        open(marker, "w").write(node_id)

with fedlab.Researcher(address, service="attach") as r:
    r.wait_for_nodes(n, timeout=60)
    exp = fedlab.Experiment(r, ["cancer"], SlowLogReg, model_args={"n_features": 30, "step_seconds": 0.5},
                            training_args={"batch_size": 32, "num_updates": 12, "optimizer_args": {"lr": 0.05}},
                            rounds=1, round_timeout=300, on_progress=on_progress)
    exp.run_once()
print("the round ended: this kernel was not killed in time")
"""


@pytest.fixture
def run_dir(monkeypatch):
    path = private_run_dir()
    monkeypatch.setenv(RUN_DIR_ENV, str(path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return path


@pytest.fixture
def service(run_dir, address):
    svc = ServiceProcess(address)
    svc.wait_listening()
    yield svc
    svc.stop()


@pytest.fixture
def cancer_nodes(tmp_path, address):
    from slow_plan import cancer_sites

    frames = cancer_sites(2)
    nodes = []
    for i, frame in enumerate(frames):
        node = NodeProcess.create(tmp_path, f"site-{chr(97 + i)}", address, frame=frame, tags=TAGS, heartbeat=0.5)
        config = node.directory / "config.toml"
        config.write_text(config.read_text().replace("require_approval = true", "require_approval = false"))
        nodes.append(node.start())
    yield nodes, pd.concat(frames, ignore_index=True)
    for node in nodes:
        node.stop()


@pytest.fixture(autouse=True)
def no_client_left(monkeypatch):
    """Every client process a test starts is gone when it ends, passed or failed."""
    import service_helpers

    started = []
    real = service_helpers.client

    def tracked(*args, **kwargs):
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setitem(globals(), "client", tracked)
    yield
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def read_json(path):
    return json.loads(path.read_text())


@pytest.mark.timeout(300)
def test_two_kernels_run_statistics_at_once_and_each_gets_its_own(tmp_path, address, service, cancer_nodes):
    nodes, pooled = cancer_nodes
    stop = tmp_path / "stop"
    outs = {col: tmp_path / f"client-{i}.json" for i, col in enumerate(["mean radius", "worst area"])}
    procs = {col: client(STATS_CLIENT, address, col, "2", str(out), str(stop), out=tmp_path / f"client-{i}.log")
             for i, (col, out) in enumerate(outs.items())}
    # both loops running: each has answers, then at least five more each while the other runs
    wait_until(lambda: all(out.with_suffix(".json.partial").exists() for out in outs.values()), 120,
               "both kernels to get a first answer")
    counts = {c: len(read_json(o.with_suffix(".json.partial"))["results"]) for c, o in outs.items()}
    wait_until(lambda: all(len(read_json(o.with_suffix(".json.partial"))["results"]) >= counts[c] + 5
                           for c, o in outs.items()), 120, "five more answers in each kernel")
    stop.write_text("")
    for col, proc in procs.items():
        assert proc.wait(120) == 0, (tmp_path / f"client-{list(outs).index(col)}.log").read_text()
    answers = {col: read_json(out) for col, out in outs.items()}
    assert answers["mean radius"]["id"] != answers["worst area"]["id"]  # two researchers, one service
    for col, answer in answers.items():
        for columns, count, mean in answer["results"]:
            assert columns == [col]  # never the other kernel's reply
            assert count == len(pooled)
            assert mean == pytest.approx(pooled[col].mean(), rel=1e-9)
    a, b = answers["mean radius"]["times"], answers["worst area"]["times"]
    assert a[0][0] < b[-1][1] and b[0][0] < a[-1][1]  # the two loops ran at the same time
    assert "discarded" not in service.log()


@pytest.mark.timeout(400)
def test_a_kernel_killed_mid_round_leaves_the_others_requests_and_the_nodes(tmp_path, address, service,
                                                                             cancer_nodes):
    nodes, pooled = cancer_nodes
    stop, marker, out = tmp_path / "stop", tmp_path / "training", tmp_path / "stats.json"
    stats = client(STATS_CLIENT, address, "mean radius", "2", str(out), str(stop), out=tmp_path / "stats.log")
    trainer = client(TRAIN_CLIENT, address, "2", str(marker), out=tmp_path / "train.log")
    wait_until(lambda: marker.exists() or trainer.poll() is not None, 240, "the trainer's round to start on a node")
    assert trainer.poll() is None, (tmp_path / "train.log").read_text()
    partial = out.with_suffix(".json.partial")
    wait_until(partial.exists, 120, "the other kernel's first answer")
    trainer.send_signal(signal.SIGKILL)
    assert trainer.wait(10) == -signal.SIGKILL
    killed_at = time.time()
    # the service saw it go and dropped its round; the nodes finish the round and their replies are discarded
    wait_until(lambda: "dropped its 2 request(s) in flight (train_request" in service.log(), 30,
               "the service to drop the killed kernel's requests")
    wait_until(lambda: service.log().count("discarded a train_reply") == 2, 120,
               "both nodes' replies to the dead kernel to be discarded")
    assert "which has gone" in service.log()
    before = len(read_json(partial)["results"])
    wait_until(lambda: len(read_json(partial)["results"]) >= before + 3, 120, "more answers after the kill")
    stop.write_text("")
    assert stats.wait(120) == 0, (tmp_path / "stats.log").read_text()
    answer = read_json(out)
    assert answer["times"][-1][0] > killed_at  # its job kept running after the other kernel died
    for columns, count, mean in answer["results"]:
        assert columns == ["mean radius"] and count == len(pooled)
        assert mean == pytest.approx(pooled["mean radius"].mean(), rel=1e-9)
    assert set(answer["status"].values()) <= {"online", "busy"}, answer["status"]  # connected (busy: working)
    status = cli("researcher", "status", "--address", address)
    assert status.returncode == 0 and "2 known, 2 online or busy" in status.stdout, status.stdout
    for node in nodes:
        assert node.proc is not None and node.proc.poll() is None
        assert node.log().count("connected to researcher") == 1  # never lost the service


@pytest.mark.timeout(300)
def test_a_restarted_kernel_sees_the_nodes_online_at_once_and_they_never_reconnect(tmp_path, address, service,
                                                                                    cancer_nodes):
    nodes, pooled = cancer_nodes
    with Researcher(address) as first:  # service="auto" finds the service
        assert first.attached and first.service.pid == service.proc.pid
        first.wait_for_nodes(2, timeout=60)
        seen = first.nodes().set_index("node_id")["last_seen"]
    for i in range(2):  # a kernel restart: a new process, each time
        out = tmp_path / f"restart-{i}.json"
        proc = client(STATS_CLIENT, address, "mean radius", "2", str(out), str(tmp_path / "go"),
                      out=tmp_path / f"restart-{i}.log")
        (tmp_path / "go").write_text("")
        assert proc.wait(120) == 0, (tmp_path / f"restart-{i}.log").read_text()
        assert read_json(out)["at_attach"] == sorted(n.node_id for n in nodes)
    with Researcher(address) as again:
        assert sorted(again.online_node_ids()) == sorted(n.node_id for n in nodes)  # no wait at all
        later = again.nodes().set_index("node_id")["last_seen"]
        assert (later >= seen).all()
    for node in nodes:
        assert node.log().count("connected to researcher") == 1, node.log()[-2000:]
    assert "offline until it reconnects" not in service.log()  # no node connection ever ended


def test_node_status_changes_reach_every_kernel(address, service, cancer_nodes):
    nodes, _ = cancer_nodes
    with Researcher(address) as a, Researcher(address) as b:
        a.wait_for_nodes(2, timeout=60)
        b.wait_for_nodes(2, timeout=60)
        nodes[0].stop()
        for r in (a, b):
            wait_until(lambda r=r: nodes[0].node_id not in r.online_node_ids(), 20, "the stopped node to go offline")
        nodes[0].start()
        for r in (a, b):
            wait_until(lambda r=r: nodes[0].node_id in r.online_node_ids(), 60, "the node to come back")


def test_a_second_service_on_the_same_port_is_refused_by_name(address, service):
    done = cli("researcher", "start", "--address", address.replace("127.0.0.1", "0.0.0.0"))
    assert done.returncode == 2, done.stderr
    assert f"a researcher service already runs for {address} (pid {service.proc.pid}" in done.stderr
    assert "fedlab researcher stop" in done.stderr and "Traceback" not in done.stderr
    assert service.proc.poll() is None
    with pytest.raises(FedlabTransportError, match="A researcher service .* holds"):
        Researcher(address, service="own")


def test_a_service_file_left_by_a_killed_service_is_detected_and_removed(run_dir, address):
    svc = ServiceProcess(address)
    info = svc.wait_listening()
    svc.proc.send_signal(signal.SIGKILL)
    svc.proc.wait(10)
    paths = service_paths(address)
    assert paths.info.exists()  # nothing could clean up after SIGKILL
    status = cli("researcher", "status", "--address", address)
    assert status.returncode == 1 and "no researcher service runs" in status.stdout, status
    assert "no longer running" in status.stderr and str(info.pid) in status.stderr
    assert not paths.info.exists() and not paths.socket.exists()
    with Researcher(address) as own:  # auto: nothing to attach to, so it binds the address itself
        assert not own.attached
    with pytest.raises(Exception, match="no researcher service runs"):
        Researcher(address, service="attach")
    again = ServiceProcess(address)  # the port and its files are free again
    try:
        assert again.wait_listening().pid == again.proc.pid
        assert find_service(address) is not None
    finally:
        assert again.stop() == 0
    assert find_service(address) is None and not paths.info.exists()


def test_a_kernel_gets_a_clear_error_when_the_service_dies(address, service, cancer_nodes):
    with Researcher(address) as researcher:
        researcher.wait_for_nodes(2, timeout=60)
        service.proc.send_signal(signal.SIGKILL)
        service.proc.wait(10)

        def failed() -> str:
            try:
                researcher.nodes()
            except FedlabTransportError as exc:
                return str(exc)
            return ""

        message = wait_until(failed, 20, "the kernel to notice the service is gone")
        assert "went away" in message and "fedlab researcher start" in message
        with pytest.raises(FedlabTransportError, match="went away"):
            researcher.search(["cancer"])
    with Researcher(address) as rebound:  # it may bind the address itself now; the nodes come to it
        assert not rebound.attached
        rebound.wait_for_nodes(2, timeout=60)
