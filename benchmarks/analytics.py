"""End-to-end federated statistics against the slowest node's local pandas time, in one run.

8 real `fedlab node start` processes each hold 100,000 rows x 10 numeric columns (CSV). The
researcher asks for count, mean, std, min, max and a 20-bin histogram of every column (two
rounds: the histogram's edges come from the federated range). The reference is the same
computation done by pandas/numpy on each node's frame, measured here, and the slowest of
those. Target: end-to-end <= 1.3 x slowest local + 20 ms. Medians of several repeats, after
one warm-up (which also lets each node cache its CSV).

    .venv/bin/python benchmarks/analytics.py [--nodes 8] [--rows 100000] [--repeats 5]

With ``--nodes 1 --rows 11000000 --repeats 1 --timeout 600`` the node holds a 1 GB CSV: the
first request (which reads it) must be answered, with the node shown ``busy``, never offline.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fedlab.node.config import init_node_dir
from fedlab.node.registry import DatasetRegistry
from fedlab.researcher import Researcher

STATS = ["count", "mean", "std", "min", "max", "histogram"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_pandas_seconds(frame: pd.DataFrame, bins: int, repeats: int) -> float:
    """What one node would spend with plain pandas: the same statistics on its own frame."""
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        frame.count()
        frame.mean()
        frame.std()
        lo, hi = frame.min(), frame.max()
        for column in frame.columns:
            np.histogram(frame[column].dropna(), bins=bins, range=(lo[column], hi[column]))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--columns", type=int, default=10)
    parser.add_argument("--bins", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds a request may take (the first reads the CSV: raise it for a 1 GB file)")
    args = parser.parse_args()
    address = f"tcp://127.0.0.1:{free_port()}"
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        frames, procs = [], []
        for i in range(args.nodes):
            frame = pd.DataFrame(rng.normal(50 + i, 10, size=(args.rows, args.columns)),
                                 columns=[f"x{j}" for j in range(args.columns)])
            frames.append(frame)
            node_dir = Path(tmp) / f"node-{i}"
            config = init_node_dir(node_dir, f"bench-{i}", address)
            text = (node_dir / "config.toml").read_text().replace('min_max = "off"', 'min_max = "noisy"')
            (node_dir / "config.toml").write_text(text)
            csv = node_dir / "data.csv"
            frame.to_csv(csv, index=False)
            DatasetRegistry(config.db_path).add("bench", ["bench"], "csv", csv)
            procs.append(subprocess.Popen([sys.executable, "-m", "fedlab", "node", "start", str(node_dir)],
                                          stderr=subprocess.DEVNULL))
        try:
            with Researcher(address) as researcher:
                researcher.wait_for_nodes(args.nodes, timeout=60)
                fds = researcher.search("bench")
                times = []
                seen: set[str] = set()  # the nodes' statuses while they work: busy or online, never offline
                watching = threading.Event()

                def watch() -> None:
                    while not watching.is_set():
                        seen.update(researcher.nodes().status)
                        time.sleep(0.2)

                watcher = threading.Thread(target=watch, daemon=True)
                watcher.start()
                for _ in range(args.repeats + 1):
                    t0 = time.perf_counter()
                    result = researcher.stats(fds, stats=STATS, bins=args.bins, timeout=args.timeout)
                    times.append(time.perf_counter() - t0)
                    assert len(result.answered) == args.nodes, result.notes()
                watching.set()
                watcher.join(5)
                end_to_end = statistics.median(times[1:])
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(60)  # a node still reading a large CSV stops when that read ends
        slowest = max(local_pandas_seconds(f, args.bins, args.repeats) for f in frames)
    target = 1.3 * slowest + 0.020
    print(f"{args.nodes} nodes x {args.rows} rows x {args.columns} columns; stats {STATS} ({args.bins} bins)")
    print(f"first request (the node reads its CSV): {times[0]:8.2f} s, answered by all {args.nodes} nodes; "
          f"statuses seen meanwhile: {sorted(seen)}")
    print(f"end-to-end (median of {args.repeats}): {end_to_end * 1000:8.1f} ms")
    print(f"slowest node's local pandas:        {slowest * 1000:8.1f} ms")
    print(f"target 1.3 x local + 20 ms:         {target * 1000:8.1f} ms  -> "
          f"{'met' if end_to_end <= target else 'NOT met'} (ratio {end_to_end / slowest:.2f})")


if __name__ == "__main__":
    main()
