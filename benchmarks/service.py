"""One training round through the researcher service beside the same round with the socket in the kernel.

The same N real `fedlab node start` processes serve both: first the researcher binds the address
itself (``Researcher(address, service="own")``, the direct path), then a `fedlab researcher start`
process binds it and the researcher attaches to it (``service="attach"``): the global model goes
kernel -> service -> nodes and each reply node -> service -> kernel (large buffers through
memory files the other side maps, see docs/service.md). The round, plan and models are
`benchmarks/rounds.py`'s (one linear layer, one optimizer step on one row: near-zero compute).
Each path runs one warm-up round then ``--rounds`` timed rounds; with ``--repeats 2`` the two
paths alternate twice (direct, service, direct, service), which shows how much the machine's
load moved between them. Printed per path: min / median / max round time, the ratio of the
medians service / direct, and the CPU seconds per timed round of the researcher's process, of
the service process (service path only) and of the nodes (with their training workers), from
/proc: on a loaded machine the CPU figures move less than the wall-clock ones.

Target (issue 17): the service path costs at most 10% on the 100 MB round at N = 2.

    .venv/bin/python benchmarks/service.py [--nodes 2] [--models large] [--rounds 5] [--repeats 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rounds import MODELS, PLAN, TimedFedAvg, _descendants, approve, start_nodes  # benchmarks/ is on sys.path
from transport import free_port

from fedlab import Experiment, Researcher
from fedlab.transport.service_files import RUN_DIR_ENV, find_service

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its descendants (a node's training worker), from /proc."""
    total = 0
    for p in _descendants(pid):
        try:
            with open(f"/proc/{p}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / TICK


def timed_rounds(address: str, service: str, n: int, model: str, rounds: int, dirs: list[Path],
                 pids: dict[str, list[int]]) -> tuple[list[float], dict[str, float]]:
    """Round times (seconds) of ``rounds`` rounds after one warm-up, through ``service`` ("own" or "attach"),
    and the CPU seconds per round of each group of ``pids``."""
    n_in, n_out = MODELS[model]
    with Researcher(address, service=service) as researcher:
        researcher.wait_for_nodes(n, timeout=60)
        exp = Experiment(researcher, tags=["bench"], training_plan=PLAN, plan_class="BenchPlan",
                         model_args={"n_in": n_in, "n_out": n_out},
                         training_args={"num_updates": 1, "batch_size": 1, "optimizer_args": {"lr": 0.0}},
                         rounds=rounds + 1, aggregator=TimedFedAvg(), round_timeout=300)
        exp.approve("benchmark plan")
        approve(dirs, exp.plan_id)
        exp.run_once()  # warm-up: the workers import torch and load the plan (the first path), or are warm
        before = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            exp.run_once()
            times.append(time.perf_counter() - t0)
        cpu = {k: (sum(cpu_seconds(p) for p in v) - before[k]) / rounds for k, v in pids.items()}
        history = exp.history
        assert (history["status"] == "ok").all(), history[history["status"] != "ok"]
        return times, cpu


def start_service(address: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedlab", "researcher", "start", "--address", address],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while find_service(address, settle=0.0) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the researcher service did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc


def stop_service(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(30)


def row(model: str, n: int, mode: str, times: list[float], direct: list[float] | None,
        cpu: dict[str, float] | None = None) -> str:
    ms = [t * 1e3 for t in times]
    vs = f"{statistics.median(times) / statistics.median(direct):>14.3f}" if direct else f"{'':>14}"
    cpus = "" if cpu is None else " | " + " ".join(f"{cpu.get(k, 0.0) * 1e3:>8.0f}" for k in ("researcher", "service",
                                                                                            "nodes"))
    return (f"{model:>6} {n:>5} {mode:>8} | {min(ms):>13.1f} {statistics.median(ms):>8.1f} {max(ms):>8.1f} | "
            f"{vs}{cpus}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[2])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["large"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="alternate the two paths this many times")
    args = parser.parse_args()
    logging.getLogger("fedlab").setLevel(logging.ERROR)  # the INSECURE warnings would break the table
    print(f"{'model':>6} {'nodes':>5} {'path':>8} | {'round ms: min':>13} {'median':>8} {'max':>8} | "
          f"{'service/direct':>14} | {'cpu ms/round: researcher':>8} {'service':>8} {'nodes':>8}")
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as tmp:
        root = Path(tmp)
        os.environ[RUN_DIR_ENV] = str(root / "run")  # this run's services only, found by this run only
        for model in args.models:
            for n in args.nodes:
                address = f"tcp://127.0.0.1:{free_port()}"
                dirs, procs, _ = start_nodes(root, n, address)
                pids = {"researcher": [os.getpid()], "nodes": [p.pid for p in procs]}
                try:
                    direct_all: list[float] = []
                    service_all: list[float] = []
                    for _ in range(args.repeats):
                        direct, cpu = timed_rounds(address, "own", n, model, args.rounds, dirs, pids)
                        direct_all += direct
                        print(row(model, n, "direct", direct, None, cpu), flush=True)
                        service = start_service(address, root / "service.log")
                        try:
                            through, cpu = timed_rounds(address, "attach", n, model, args.rounds, dirs,
                                                        {**pids, "service": [service.pid]})
                        finally:
                            stop_service(service)
                        service_all += through
                        print(row(model, n, "service", through, direct, cpu), flush=True)
                    if args.repeats > 1:
                        print(row(model, n, "all", service_all, direct_all), flush=True)
                finally:
                    for p in procs:
                        p.terminate()
                    for p in procs:
                        p.wait(10)


if __name__ == "__main__":
    main()
