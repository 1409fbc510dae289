"""Round trip of a payload to N real nodes and back: fedlab against raw pyzmq, in the same run.

For each payload size (1 MB, 100 MB) and N (1, 2, 8), the researcher sends the payload as a
raw buffer frame in a ping request to N `fedlab node start` processes, which echo it back;
the time is from send until the last reply. The baseline does the same with bare pyzmq: a
ROUTER and N DEALER echo processes, no envelope, no validation, no threads. The ratio is
fedlab / raw (1.0 means fedlab adds nothing over the wire). Medians of several repeats.

    .venv/bin/python benchmarks/transport.py [--sizes-mb 1 100] [--nodes 1 2 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from fedlab.node.config import init_node_dir
from fedlab.protocol import PingRequest
from fedlab.researcher import DiscardOnTimeout, Researcher

RAW_ECHO = """
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0)
s.setsockopt(zmq.IDENTITY, sys.argv[2].encode()); s.connect(sys.argv[1]); s.send(b"ready")
while True:
    frames = s.recv_multipart(copy=False)
    if frames[0].bytes == b"stop":
        break
    s.send_multipart(frames, copy=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_fedlab(root: Path, n: int, payloads: dict[int, bytes], repeats: int) -> dict[int, float]:
    address = f"tcp://127.0.0.1:{free_port()}"
    procs = []
    for i in range(n):
        node_dir = root / f"fedlab-{n}-{i}"
        init_node_dir(node_dir, f"bench-{i}", address)
        procs.append(subprocess.Popen([sys.executable, "-m", "fedlab", "node", "start", str(node_dir)],
                                      stderr=subprocess.DEVNULL))
    results = {}
    try:
        with Researcher(address) as researcher:
            researcher.wait_for_nodes(n, timeout=60)
            for size, payload in payloads.items():
                times = []
                for _ in range(repeats + 1):  # first run warms up
                    t0 = time.perf_counter()
                    req = researcher.requests.send(PingRequest(), policies=[DiscardOnTimeout(120)],
                                                   buffers=[payload]).wait()
                    times.append(time.perf_counter() - t0)
                    replies = req.replies()
                    assert len(replies) == n and all(len(e.buffers[0]) == size for e in replies.values()), \
                        f"lost replies: {req.missing()}"
                    del req, replies
                results[size] = statistics.median(times[1:])
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
    return results


def bench_raw(n: int, payloads: dict[int, bytes], repeats: int) -> dict[int, float]:
    address = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(address)
    ids = [f"raw-{i}".encode() for i in range(n)]
    procs = [subprocess.Popen([sys.executable, "-c", RAW_ECHO, address, i.decode()]) for i in ids]
    results = {}
    try:
        for _ in ids:
            router.recv_multipart()
        for size, payload in payloads.items():
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                for identity in ids:
                    router.send_multipart([identity, payload], copy=False)
                for _ in ids:
                    reply = router.recv_multipart(copy=False)
                    assert len(reply[1]) == size
                times.append(time.perf_counter() - t0)
            results[size] = statistics.median(times[1:])
    finally:
        for identity in ids:
            router.send_multipart([identity, b"stop"])
        for p in procs:
            p.wait(10)
        router.close()
        ctx.term()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 100])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    payloads = {int(mb * 1_000_000): bytes(int(mb * 1_000_000)) for mb in args.sizes_mb}
    print(f"{'payload':>10} {'nodes':>5} {'fedlab s':>10} {'raw zmq s':>10} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.nodes:
            fed = bench_fedlab(Path(tmp), n, payloads, args.repeats)
            raw = bench_raw(n, payloads, args.repeats)
            for size in payloads:
                print(f"{size / 1e6:>8g}MB {n:>5} {fed[size]:>10.4f} {raw[size]:>10.4f} "
                      f"{fed[size] / raw[size]:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
