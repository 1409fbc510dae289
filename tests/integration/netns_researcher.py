"""The researcher of ``test_netns.py``, run as a script inside its own network namespace.

It binds ``--address``, waits for the nodes, and trains ``SlowLogReg`` for three rounds,
telling the test what happens as one JSON object per line on stdout:

- ``{"event": "online", "nodes": [...]}`` once every node has dialled in;
- ``{"event": "training", "node": ID, "round": 2}`` when the ``--target`` node reports it is
  training round 2 (the test cuts that node's link then);
- ``{"event": "round", "round": R, "rows": [...]}`` after each round (node, status, reason);
- ``{"event": "rejoined", "node": ID}`` once the target is online again, which it waits for
  after the test writes ``link-up`` on stdin.

Any failure ends the script with its traceback on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from slow_plan import TAGS, SlowLogReg  # noqa: E402

from fedlab import Experiment, Researcher  # noqa: E402

_print_lock = threading.Lock()


def say(event: str, **fields: object) -> None:
    with _print_lock:
        print(json.dumps({"event": event, **fields}), flush=True)


def rows(frame) -> list[dict[str, object]]:
    return [{"node_id": r.node_id, "node": r.node, "status": r.status, "reason": r.reason,
             "n_samples": int(r.n_samples)} for r in frame.itertuples()]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--target", required=True, help="the node whose link the test cuts in round 2")
    parser.add_argument("--model-args", type=json.loads, required=True)
    parser.add_argument("--training-args", type=json.loads, required=True)
    parser.add_argument("--heartbeat", type=float, default=0.2)
    opts = parser.parse_args()
    reported = threading.Event()

    def on_progress(node_id: str, event) -> None:
        if node_id == opts.target and event.round == 2 and event.phase == "training" and not reported.is_set():
            reported.set()
            say("training", node=node_id, round=2)

    with Researcher(opts.address, heartbeat_interval=opts.heartbeat) as researcher:
        say("online", nodes=sorted(researcher.wait_for_nodes(opts.nodes, timeout=90)))
        exp = Experiment(researcher, list(TAGS), SlowLogReg, model_args=opts.model_args,
                         training_args=opts.training_args, rounds=3, round_timeout=120, disconnect_grace=2.0,
                         on_progress=on_progress)
        for round_ in (1, 2):
            say("round", round=round_, rows=rows(exp.run_once()))
        if sys.stdin.readline().strip() != "link-up":
            raise SystemExit("expected `link-up` on stdin")
        deadline = time.monotonic() + 90
        while opts.target not in researcher.online_node_ids():
            if time.monotonic() > deadline:
                raise SystemExit(f"node {opts.target} did not come back within 90 s of its link coming up")
            time.sleep(0.05)
        say("rejoined", node=opts.target)
        say("round", round=3, rows=rows(exp.run_once()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
