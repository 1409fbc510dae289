"""Failures in the middle of training, with real processes: a node killed, a kernel restarted.

A node SIGKILLed while it trains is dropped from that round by the experiment's disconnect
policy, the other nodes' round completes and the history names the dead node and why; the same
node directory started again rejoins and trains in the next round (its optimizer state, kept
in its SQLite database, survives the kill). A node restarted at once, as a supervisor would,
is left out of the round as restarted instead of being waited for until the round timeout.
A Jupyter kernel that dies in the middle of an
experiment loses everything it held; a fresh kernel resumes from the last breakpoint and ends
with the parameters of an uninterrupted run of the same seeds.
"""

from __future__ import annotations

import inspect
import json
import queue
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from federation import HEARTBEAT, NodeProcess, wait_until

torch = pytest.importorskip("torch")

from slow_plan import TAGS, SlowLogReg, cancer_sites  # noqa: E402

from fedlab import Experiment, Researcher  # noqa: E402

pytestmark = pytest.mark.integration

# As in test_training.py: a node's first round imports torch, which can starve its heartbeats on a
# busy 2-core machine; 0.5 s heartbeats keep a healthy node from flapping offline.
NODE_HEARTBEAT = 0.5
STEP_SECONDS = 0.4  # each of the 8 steps: a round lasts about 3 s, time enough to interrupt it
MODEL_ARGS = {"n_features": 30, "step_seconds": STEP_SECONDS}
ARGS = {"batch_size": 32, "num_updates": 8, "optimizer_args": {"lr": 0.05, "momentum": 0.9}, "seed": 11}


@pytest.fixture(autouse=True)
def one_thread_per_node(monkeypatch):
    """Node processes and kernels inherit this: one torch thread each, so they share 2 cores calmly."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def nodes(tmp_path, address):
    """Create and start ``n`` nodes (no plan approval needed) holding sites of the cancer data."""
    started: list[NodeProcess] = []

    def make(n: int) -> list[NodeProcess]:
        for i, frame in enumerate(cancer_sites(n)):
            node = NodeProcess.create(tmp_path, f"site-{chr(97 + i)}", address, frame=frame, tags=TAGS,
                                      heartbeat=NODE_HEARTBEAT)
            config = node.directory / "config.toml"
            config.write_text(config.read_text().replace("require_approval = true", "require_approval = false"))
            started.append(node.start())
        return started

    yield make
    for node in started:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.terminate()  # all at once: each takes a moment to shut down
    for node in started:
        node.stop()


def logs(nodes: list[NodeProcess]) -> str:
    return "\n".join(f"--- {n.directory.name} ---\n{n.log()[-3000:]}" for n in nodes)


@pytest.mark.timeout(300)
def test_a_node_killed_mid_round_is_named_and_rejoins_the_next_round(tmp_path, address, nodes):
    a, b, victim = nodes(3)
    killed = threading.Event()

    def on_progress(node_id, event):
        # The moment the victim says it is training round 2, SIGKILL it: no goodbye, no reply.
        if node_id == victim.node_id and event.round == 2 and event.phase == "training" and not killed.is_set():
            assert victim.proc is not None
            victim.proc.send_signal(signal.SIGKILL)
            killed.set()

    with Researcher(address, heartbeat_interval=HEARTBEAT) as researcher:
        researcher.wait_for_nodes(3, timeout=60)
        exp = Experiment(researcher, list(TAGS), SlowLogReg, model_args=MODEL_ARGS, training_args=ARGS, rounds=3,
                         round_timeout=120, disconnect_grace=2.0, on_progress=on_progress)
        first = exp.run_once().set_index("node_id")  # the nodes' first round imports torch: slow
        assert (first["status"] == "ok").all(), (first, logs([a, b, victim]))

        started = time.monotonic()
        second = exp.run_once().set_index("node_id")
        took = time.monotonic() - started
        assert killed.is_set(), "the victim never reported training round 2"
        assert victim.proc is not None and victim.proc.wait(10) == -signal.SIGKILL
        assert second.loc[[a.node_id, b.node_id], "status"].tolist() == ["ok", "ok"], second
        row = second.loc[victim.node_id]
        assert (row["status"], row["node"]) == ("missing", "site-c"), second
        # ended by the disconnect policy (2 s after the node went silent), not by the 120 s round timeout
        assert row["reason"].startswith("disconnected:") and "DiscardOnDisconnect" in row["reason"], row["reason"]
        assert took < exp.round_timeout  # a hang guard only: the reason above says which policy ended it
        assert sorted(exp.aggregator.added) == sorted([a.node_id, b.node_id])
        assert exp.round_current == 2
        status = researcher.nodes().set_index("node_id").loc[victim.node_id, "status"]
        assert status == "offline"

        victim.start()  # the same node directory: same node id, same database
        wait_until(lambda: victim.node_id in researcher.online_node_ids(), 60, "the restarted node to come back")
        third = exp.run_once().set_index("node_id")
        assert (third["status"] == "ok").all(), (third, logs([a, b, victim]))
        assert third.loc[victim.node_id, "n_samples"] == first.loc[victim.node_id, "n_samples"]
        assert sorted(exp.aggregator.added) == sorted(n.node_id for n in (a, b, victim))
    rows = sorted(exp.history[["round", "node", "status"]].values.tolist())
    assert rows == [[r, f"site-{x}", "missing" if (r, x) == (2, "c") else "ok"] for r in (1, 2, 3) for x in "abc"]


@pytest.mark.timeout(300)
def test_a_node_restarted_at_once_mid_round_is_dropped_from_that_round_not_waited_for(tmp_path, address, nodes):
    """A supervisor (systemd, say) restarts a crashed node within a second, well inside the
    disconnect grace: the new process knows nothing of the round, so the researcher must not
    wait for its reply until the round timeout; it drops the node as restarted."""
    a, b, victim = nodes(3)
    restarted = threading.Event()

    def on_progress(node_id, event):
        if node_id == victim.node_id and event.round == 2 and event.phase == "training" and not restarted.is_set():
            assert victim.proc is not None
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(10)
            victim.start()
            restarted.set()

    with Researcher(address, heartbeat_interval=HEARTBEAT) as researcher:
        researcher.wait_for_nodes(3, timeout=60)
        exp = Experiment(researcher, list(TAGS), SlowLogReg, model_args=MODEL_ARGS, training_args=ARGS, rounds=3,
                         round_timeout=120, disconnect_grace=10.0, on_progress=on_progress)
        first = exp.run_once().set_index("node_id")
        assert (first["status"] == "ok").all(), (first, logs([a, b, victim]))
        exp.round_timeout = 60.0  # with a node waited for in vain, round 2 would end only here
        second = exp.run_once().set_index("node_id")
        assert restarted.is_set(), "the victim never reported training round 2"
        assert second.loc[[a.node_id, b.node_id], "status"].tolist() == ["ok", "ok"], second
        row = second.loc[victim.node_id]
        assert (row["status"], row["node"]) == ("missing", "site-c"), second
        assert row["reason"].startswith("restarted:"), row["reason"]
        wait_until(lambda: victim.node_id in researcher.online_node_ids(), 60, "the restarted node to be online")
        third = exp.run_once().set_index("node_id")
        assert (third["status"] == "ok").all(), (third, logs([a, b, victim]))


PLAN_IMPORTS = ("import time\nimport torch.nn.functional as F\nfrom torch import nn\n"
                "from fedlab import TorchTrainingPlan\n")

SETUP_CELL = """
import os, threading
from pathlib import Path
import fedlab

researcher = fedlab.Researcher(os.environ["FEDLAB_ADDRESS"], heartbeat_interval={heartbeat})
researcher.wait_for_nodes(2, timeout=60)
wedged = threading.Event()

def on_progress(node_id, event):
    # Round 3 is under way on a node: note it, then wedge the researcher's network thread, as a
    # kernel that hangs mid-round does. Round 3 can never end here; the user restarts the kernel.
    if event.round == 3 and not wedged.is_set():
        wedged.set()
        Path({marker!r}).touch()
        threading.Event().wait()

exp = fedlab.Experiment(researcher, {tags!r}, SlowLogReg, model_args={model_args!r}, training_args={args!r},
                        rounds=4, round_timeout=120, breakpoint_dir={breakpoints!r}, on_progress=on_progress)
"""

RESUME_CELL = """
assert "exp" not in globals() and "researcher" not in globals() and "SlowLogReg" not in globals(), \\
    "the restarted kernel still holds the old kernel's objects"
import json, os
from pathlib import Path
import numpy as np
import fedlab

researcher = fedlab.Researcher(os.environ["FEDLAB_ADDRESS"], heartbeat_interval={heartbeat})
researcher.wait_for_nodes(2, timeout=60)
exp = fedlab.Experiment.load_breakpoint({breakpoints!r}, researcher)  # the plan travels in the breakpoint
resumed_at = exp.round_current
history = exp.run()
np.savez({params!r}, **exp.params)
Path({summary!r}).write_text(json.dumps({{"resumed_at": resumed_at, "rounds": history["round"].tolist(),
                                          "status": history["status"].tolist()}}))
researcher.close()
"""


def run_cell(client, code: str, timeout: float) -> str:
    """Run ``code`` in the kernel and return what it printed; fail with the kernel's traceback on an error."""
    printed: list[str] = []

    def output(msg) -> None:
        if msg["msg_type"] == "stream":
            printed.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            printed.append("\n".join(msg["content"]["traceback"]))

    reply = client.execute_interactive(code, timeout=timeout, output_hook=output)
    content = reply["content"]
    if content["status"] != "ok":
        raise AssertionError(f"the kernel failed: {content.get('ename')}: {content.get('evalue')}\n{''.join(printed)}")
    return "".join(printed)


def wait_for_marker(client, msg_id: str, marker: Path, timeout: float) -> None:
    """Wait until ``marker`` exists; fail at once if the cell ``msg_id`` ends first (it must not)."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"round 3 did not start within {timeout} s")
        try:
            msg = client.get_shell_msg(timeout=0.2)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") == msg_id:
            content = msg["content"]
            raise AssertionError(f"exp.run() ended before the restart: {content.get('status')} "
                                 f"{content.get('ename', '')}: {content.get('evalue', '')}")


@pytest.mark.timeout(400)
def test_a_kernel_restarted_mid_experiment_resumes_from_its_breakpoint_to_the_uninterrupted_result(
        tmp_path, address, nodes):
    jupyter_client = pytest.importorskip("jupyter_client")
    pytest.importorskip("ipykernel")
    from notebook_federation import kernel_env

    running = nodes(2)
    with Researcher(address, heartbeat_interval=HEARTBEAT) as researcher:  # the reference: 4 rounds in one go
        researcher.wait_for_nodes(2, timeout=60)
        full = Experiment(researcher, list(TAGS), SlowLogReg, model_args=MODEL_ARGS, training_args=ARGS, rounds=4,
                          round_timeout=120)
        full.run()
    assert (full.history["status"] == "ok").all(), (full.history, logs(running))

    breakpoints, marker = tmp_path / "breakpoints", tmp_path / "round-3-started"
    params_file, summary_file = tmp_path / "resumed.npz", tmp_path / "resumed.json"
    env = kernel_env({"FEDLAB_ADDRESS": address, "OMP_NUM_THREADS": "1"}, tmp_path / "jupyter")
    km = jupyter_client.KernelManager(kernel_name="python3")
    km.start_kernel(env=env, cwd=str(tmp_path))
    client = km.blocking_client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        run_cell(client, PLAN_IMPORTS + inspect.getsource(SlowLogReg), timeout=60)  # the plan typed into a cell
        run_cell(client, SETUP_CELL.format(heartbeat=HEARTBEAT, marker=str(marker), tags=list(TAGS),
                                           model_args=MODEL_ARGS, args=ARGS, breakpoints=str(breakpoints)),
                 timeout=120)
        msg_id = client.execute("history = exp.run()")  # 4 rounds; it wedges in round 3
        wait_for_marker(client, msg_id, marker, timeout=240)
        km.restart_kernel(now=True)  # the kernel process is killed: everything it held is gone
        saved = sorted(p.name for p in breakpoints.iterdir() if p.name.startswith("round-"))
        assert saved == ["round-0001", "round-0002"], saved  # round 3 was under way, never finished
        client.wait_for_ready(timeout=60)
        run_cell(client, RESUME_CELL.format(heartbeat=HEARTBEAT, breakpoints=str(breakpoints),
                                            params=str(params_file), summary=str(summary_file)), timeout=240)
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)

    summary = json.loads(summary_file.read_text())
    assert summary["resumed_at"] == 2
    assert summary["rounds"] == full.history["round"].tolist() == [1, 1, 2, 2, 3, 3, 4, 4]
    assert summary["status"] == ["ok"] * 8, (summary, logs(running))
    with np.load(params_file, allow_pickle=False) as resumed:
        assert sorted(resumed.files) == sorted(full.params)
        for name, value in full.params.items():
            np.testing.assert_allclose(resumed[name], value, rtol=0, atol=1e-6)
