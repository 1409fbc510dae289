"""One process per node directory, with real processes: a second `fedlab node start` on a directory
already served is refused at once, naming the PID that serves it, and leaves the running node alone;
once that node is SIGKILLed the directory can be started again (the kernel released the lock)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from federation import HEARTBEAT, wait_until

from fedlab import Researcher
from fedlab.node.audit import AUDIT_FILE
from fedlab.node.dir_lock import LOCK_FILE

pytestmark = pytest.mark.integration


def sessions(researcher: Researcher) -> dict[str, str]:
    return {r.node_id: r.session for r in researcher._transport.nodes()}


def status_of(researcher: Researcher, node_id: str) -> str | None:
    frame = researcher.nodes()
    rows = frame[frame.node_id == node_id]
    return None if rows.empty else rows.iloc[0]["status"]


def lock_holder(directory) -> int | None:
    try:
        return int(json.loads((directory / LOCK_FILE).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def start_again(node) -> subprocess.CompletedProcess[str]:
    """A second `fedlab node start` on ``node``'s directory, run to its end (60 s at most)."""
    return subprocess.run(
        [sys.executable, "-m", "fedlab", "node", "start", str(node.directory), "--researcher", node.address,
         "--heartbeat", str(node.heartbeat)],
        capture_output=True, text=True, timeout=60, check=False, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


@pytest.mark.timeout(240)
def test_a_second_start_on_a_served_directory_is_refused_and_the_first_keeps_serving(make_nodes, address):
    (node,) = make_nodes(1)
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
        node.start()
        r.wait_for_nodes(1, timeout=60)
        first_pid = node.proc.pid
        assert lock_holder(node.directory) == first_pid
        session = sessions(r)[node.node_id]
        assert session
        audit_before = (node.directory / AUDIT_FILE).read_bytes() if (node.directory / AUDIT_FILE).exists() else b""

        second = start_again(node)  # a deadline of 60 s: a start that ran would never end by itself
        assert second.returncode == 2, second.stderr
        err = second.stderr.strip()
        assert err.startswith("fedlab: error: node directory ") and "\n" not in err, err
        assert f"PID {first_pid}," in err and f"`kill {first_pid}`" in err, err
        assert "Traceback" not in second.stderr and second.stdout == ""

        # The refused process touched nothing: the node's log and audit are the first process's alone,
        # the lock still names it, and the researcher never heard a second session.
        assert node.proc.poll() is None, node.log()
        assert lock_holder(node.directory) == first_pid
        assert (node.directory / "node.log").read_text().count("dialing researcher") == 1
        assert (node.directory / AUDIT_FILE).read_bytes()[:len(audit_before)] == audit_before
        reply = r.ping(timeout=30).replies()[node.node_id]
        assert reply.content.node_name == "hospital-a"
        assert sessions(r) == {node.node_id: session}
        assert status_of(r, node.node_id) in ("online", "busy")

        # SIGKILL runs no clean-up at all; the kernel releases the lock, and the directory starts again.
        node.kill()
        assert lock_holder(node.directory) == first_pid  # the dead holder's record is still in the file
        node.start()
        wait_until(lambda: lock_holder(node.directory) == node.proc.pid, 60, "the new process to take the lock")
        wait_until(lambda: sessions(r).get(node.node_id) not in (None, session)
                   and status_of(r, node.node_id) == "online", 60, "the new process to come online")
        assert node.node_id in r.ping(timeout=30).replies()
        assert node.proc.poll() is None, node.log()
