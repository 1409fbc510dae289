"""Soak (issue 14): many rounds of large frames to 8 real nodes on a loaded machine, zero hangs.

Every round sends an 8 MiB buffer to 8 `fedlab node start` processes, each echoes it back, and
the request must end with all 8 replies carrying the same bytes: no reply lost, no node taken
for offline, no round waiting past its deadline. The test loads the machine itself with one
busy-loop process per core, so it measures what a shared CI machine does to the wire.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from federation import HEARTBEAT

from fedlab import DiscardOnTimeout, Researcher
from fedlab.protocol import PingRequest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

NODES = 8
ROUNDS = 25
PAYLOAD = 8 << 20
ROUND_DEADLINE = 120.0  # a hang guard: the assertion is on what came back, not on time


@pytest.fixture
def cpu_hogs():
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    yield
    for p in procs:
        p.kill()
        p.wait(10)


def test_25_rounds_of_8_mib_to_8_nodes_on_a_loaded_machine_lose_nothing(make_nodes, address, cpu_hogs):
    nodes = [n.start() for n in make_nodes(NODES)]
    rng = np.random.default_rng(14)
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
        r.wait_for_nodes(NODES, timeout=120)
        ids = sorted(n.node_id for n in nodes)
        for round_no in range(ROUNDS):
            payload = rng.integers(0, 256, PAYLOAD, dtype=np.uint8).tobytes()
            digest = hashlib.sha256(payload).digest()
            req = r.requests.send(PingRequest(echo_buffers=True), ids, [DiscardOnTimeout(ROUND_DEADLINE)],
                                  buffers=[payload]).wait()
            missing = req.missing()
            assert not missing, f"round {round_no}: {missing}"
            replies = req.replies()
            assert sorted(replies) == ids
            for node_id, env in replies.items():
                (echoed,) = env.buffers
                assert hashlib.sha256(echoed).digest() == digest, f"round {round_no}: {node_id} echoed other bytes"
            assert set(r.nodes().status) <= {"online", "busy"}
        for node in nodes:  # while the researcher is still there: no connection lost, nothing dropped
            log = node.log()
            assert node.proc.poll() is None, log[-2000:]
            assert "dropped" not in log and "connection to researcher" not in log, log[-2000:]
