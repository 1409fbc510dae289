"""What CurveZMQ encryption costs on the wire: echo round trips, plain TCP against CURVE.

A ROUTER (the researcher's socket type, with the same CURVE server setup and ZAP allowlist
check fedlab uses) sends a payload to a DEALER in another process, which echoes it back; the
median round trip is printed for each payload size, without and with CURVE. The handshake
(and the ZAP check) happens once per connection, before the timing starts, so what is left is
the per-message cost: encryption and authentication of every frame (libsodium's
crypto_box, XSalsa20-Poly1305), which grows with the payload.

    .venv/bin/python benchmarks/curve.py [--sizes 1000 1000000 100000000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import zmq

from fedlab.transport.curve import AllowlistAuthenticator
from fedlab.transport.keys import Allowlist, KeyPair


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 1_000_000, 100_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    plain, curve = run(False, args.sizes, args.repeats), run(True, args.sizes, args.repeats)
    print(f"{'payload bytes':>14}  {'plain ms':>9}  {'CURVE ms':>9}  {'CURVE / plain':>13}  {'CURVE MB/s':>10}")
    for size in args.sizes:
        rate = 2 * size / curve[size] / 1e6
        print(f"{size:>14}  {plain[size] * 1e3:>9.2f}  {curve[size] * 1e3:>9.2f}  "
              f"{curve[size] / plain[size]:>13.2f}  {rate:>10.0f}")


if __name__ == "__main__":
    main()
