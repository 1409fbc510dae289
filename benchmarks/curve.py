"""What encryption costs on the wire: echo round trips, plain TCP, CURVE and the sealed bulk path.

A ROUTER (the researcher's socket type, with the same CURVE server setup and ZAP allowlist
check fedlab uses) sends a payload to a DEALER in another process, which echoes it back; the
median round trip is printed for each payload size, without and with CURVE. The handshake
(and the ZAP check) happens once per connection, before the timing starts, so what is left is
the per-message cost: encryption and authentication of every frame (libsodium's
crypto_box, XSalsa20-Poly1305), which grows with the payload.

The third column is the bulk path (fedlab.transport.bulk_link): the same echo over a plain TCP
connection between two BulkLinks, every 1 MiB chunk sealed with AES-256-GCM by the sending
thread and opened straight into the message's buffers by the receiving one. MB/s counts both
directions (2 x payload per round trip).

    .venv/bin/python benchmarks/curve.py [--sizes 1000 1000000 100000000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import socket
import statistics
import tempfile
import time
from pathlib import Path

import zmq

from fedlab.transport.bulk_link import BulkLink, tune
from fedlab.transport.bulk_seal import TO_NODE, TO_RESEARCHER, Opener, Sealer, SessionKeys
from fedlab.transport.curve import AllowlistAuthenticator
from fedlab.transport.keys import Allowlist, KeyPair

SECRET, SESSION = bytes(range(32)), bytes(range(16))  # a benchmark's fixed session: both processes derive its keys


def echo(address: str, client: KeyPair | None, server_public: str | None, count: int) -> None:
    ctx: zmq.Context = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    if client is not None and server_public is not None:
        sock.curve_secretkey, sock.curve_publickey = client.secret.encode(), client.public.encode()
        sock.curve_serverkey = server_public.encode()
    sock.connect(address)
    sock.send(b"ready")
    for _ in range(count):
        sock.send_multipart(sock.recv_multipart(copy=False), copy=False)
    sock.close(linger=1000)
    ctx.term()


def pair() -> KeyPair:
    public, secret = zmq.curve_keypair()
    return KeyPair(public.decode(), secret.decode())


def run(curve: bool, sizes: list[int], repeats: int) -> dict[int, float]:
    ctx: zmq.Context = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    server, client, auth = pair(), pair(), None
    tmp = tempfile.TemporaryDirectory()
    if curve:
        path = Path(tmp.name) / "allowlist.txt"
        path.write_text(f"{client.public} bench\n")
        auth = AllowlistAuthenticator(ctx, Allowlist(path))
        auth.start()
        sock.curve_secretkey, sock.curve_publickey = server.secret.encode(), server.public.encode()
        sock.curve_server = True
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    count = len(sizes) * (repeats + 1)
    proc = multiprocessing.Process(target=echo, args=(f"tcp://127.0.0.1:{port}", client if curve else None,
                                                      server.public if curve else None, count))
    proc.start()
    peer, _ = sock.recv_multipart()
    medians = {}
    for size in sizes:
        payload, times = b"x" * size, []
        for i in range(repeats + 1):  # the first is a warm-up
            start = time.perf_counter()
            sock.send_multipart([peer, payload], copy=False)
            sock.recv_multipart(copy=False)
            if i:
                times.append(time.perf_counter() - start)
        medians[size] = statistics.median(times)
    proc.join(30)
    sock.close(0)
    if auth is not None:
        auth.stop()
    ctx.term()
    tmp.cleanup()
    return medians


def bulk_echo(port: int, count: int) -> None:
    keys = SessionKeys.derive(SECRET, SESSION, "bench")
    sock = socket.create_connection(("127.0.0.1", port))
    tune(sock)  # as fedlab's node does: no Nagle delay, keepalive
    done = multiprocessing.Event()
    seen = [0]

    def back(link: BulkLink, msg_id: str, frames: list[memoryview]) -> None:
        link.send(msg_id, frames)
        seen[0] += 1
        if seen[0] == count:
            done.set()
    link = BulkLink(sock, Sealer(keys, TO_RESEARCHER), Opener(keys, TO_NODE, 1 << 30), peer="bench",
                    on_message=back, on_closed=lambda *_: done.set())
    link.start()
    done.wait(600)
    link.join(30)


def run_bulk(sizes: list[int], repeats: int) -> dict[int, float]:
    keys = SessionKeys.derive(SECRET, SESSION, "bench")
    listener = socket.create_server(("127.0.0.1", 0))
    count = len(sizes) * (repeats + 1)
    proc = multiprocessing.Process(target=bulk_echo, args=(listener.getsockname()[1], count))
    proc.start()
    conn, _ = listener.accept()
    tune(conn)
    listener.close()
    echoed: queue.SimpleQueue[float] = queue.SimpleQueue()
    link = BulkLink(conn, Sealer(keys, TO_NODE), Opener(keys, TO_RESEARCHER, 1 << 30), peer="bench",
                    on_message=lambda *_: echoed.put(time.perf_counter()), on_closed=lambda *_: None)
    link.start()
    medians = {}
    for size in sizes:
        frames, times = [b"h", b"c", b"x" * size], []
        for i in range(repeats + 1):
            start = time.perf_counter()
            link.send(f"m{size}-{i}", frames)
            if i:
                times.append(echoed.get(timeout=600) - start)
            else:
                echoed.get(timeout=600)
        medians[size] = statistics.median(times)
    proc.join(60)
    link.close("done")
    link.join(5)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 1_000_000, 100_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    plain, curve = run(False, args.sizes, args.repeats), run(True, args.sizes, args.repeats)
    bulk = run_bulk(args.sizes, args.repeats)
    print(f"{'payload bytes':>14}  {'plain ms':>9}  {'CURVE ms':>9}  {'bulk ms':>9}  {'CURVE / plain':>13}  "
          f"{'bulk / plain':>12}  {'CURVE MB/s':>10}  {'bulk MB/s':>9}")
    for size in args.sizes:
        print(f"{size:>14}  {plain[size] * 1e3:>9.2f}  {curve[size] * 1e3:>9.2f}  {bulk[size] * 1e3:>9.2f}  "
              f"{curve[size] / plain[size]:>13.2f}  {bulk[size] / plain[size]:>12.2f}  "
              f"{2 * size / curve[size] / 1e6:>10.0f}  {2 * size / bulk[size] / 1e6:>9.0f}")


if __name__ == "__main__":
    main()
