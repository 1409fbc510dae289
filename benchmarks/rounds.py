"""Time and memory of one training round with near-zero local compute, beside the raw transfer floor.

A round sends the global parameters to N real `fedlab node start` processes, each node loads
them into its model, takes one optimizer step on a single row (near-zero compute), and sends
its parameters back; the researcher aggregates them (FedAvg) as they arrive. The floor is
the same bytes moved by bare pyzmq in the same run: a ROUTER sends the payload to N DEALER
echo processes and waits for every echo (`benchmarks/transport.py`'s baseline, its median).
Several timed rounds after one warm-up round (which imports torch on the nodes and loads the
plan); min / median / max of them are printed, and the ratio is median / floor.

Models: ~100k parameters (0.4 MB) and ~25M parameters (100 MB), as single linear layers.
Targets (issue 4): 100 MB round <= 1.5 x floor; small model at N = 8 <= 30 ms per round.
Targets (issue 14): the researcher's work after the last reply ("tail") < 10% of the floor at
N = 8; researcher peak RSS during rounds <= 3 x the model; an encrypted 100 MB round at N = 2
(``bulk``) within 1.5 x the plain round of the same run.

Columns:
  round ms    min / median / max of the timed rounds, researcher side (one round of ``run``).
  tail ms     median time from the moment the last reply of a round is handed to the
              aggregator until the round returns: folding it in, the mean, the next global
              model. Nothing of it overlaps the network.
  compute ms  the median time a node spent in the plan's round (its ``compute_seconds``):
              loading the parameters, one forward and backward pass and one optimizer step. For
              the 100 MB model that alone is ~150 ms of CPU per node, which the floor (an echo)
              does not pay.
  researcher  peak RSS during the timed rounds minus the RSS before the warm-up round (the
              experiment already built, so the global model itself is in the baseline; buffers
              the aggregator keeps from round to round are not), in MB and as a multiple of the
              model's size. The peak is the kernel's high-water mark (VmHWM, reset before the
              timed rounds) or the sampler's, whichever is higher.
  node        the largest node's peak RSS, the node process plus its training worker child,
              minus its RSS after the warm-up round (the worker, with torch, starts there).
              Sampled every ~20 ms (every 250 ms for models under 16 MiB, whose rounds the
              sampler would slow); the node/worker shared-memory file is counted once.
  cpu ms      CPU time (user + system) per timed round of the researcher process alone (every
              thread, the sampler's included; not the nodes, though they are its children) and of
              all node processes with their training workers: on a machine with fewer cores than
              busy processes, their sum over the cores is a floor under the round's time.
  vs plain    with ``--encrypted``: each configuration runs twice more with CurveZMQ keys (nodes
              made with a researcher key, a keyed researcher with an allowlist): ``curve`` with
              the bulk path off (every byte through CURVE), ``bulk`` with it on (messages of 1 MiB
              or more sealed with AES-256-GCM on the second connection); this is the median round
              time of that mode / plain. ``sealed`` counts the messages the researcher sent and
              received on the bulk path during the whole run (warm-up included). A node reply
              lost in a timed round (an encrypted connection that dropped and came back mid-transfer)
              is named at the end of its row; its round waited for the 60 s round timeout.

    .venv/bin/python benchmarks/rounds.py [--nodes 2 8] [--rounds 5] [--models small large] [--encrypted]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from transport import bench_raw, free_port  # benchmarks/ is on sys.path when run as a script

from fedlab import Experiment, Researcher
from fedlab.node.config import init_node_dir
from fedlab.node.registry import DatasetRegistry
from fedlab.researcher.aggregators import FedAvg
from fedlab.transport import ZmqResearcherTransport
from fedlab.transport.keys import Allowlist, create_keypair, load_keypair, read_public_key

PLAN = '''
class BenchPlan(TorchTrainingPlan):
    """One linear layer; the data is ignored but for its length (one row: near-zero compute)."""

    def init_model(self, model_args):
        return nn.Linear(model_args["n_in"], model_args["n_out"])

    def training_data(self, dataset):
        n_in = self.model.in_features
        return np.zeros((len(dataset), n_in), dtype=np.float32), np.zeros((len(dataset), self.model.out_features),
                                                                          dtype=np.float32)

    def training_step(self, data, target):
        return ((self.model(data) - target) ** 2).mean()
'''

MODELS = {  # name: (n_in, n_out) -> parameters = n_in * n_out + n_out
    "small": (316, 316),  # 100,172 parameters, 0.4 MB
    "large": (5000, 5000),  # 25,005,000 parameters, 100 MB
}
SAMPLE_S = 0.02  # for models of SMALL_MODEL_BYTES and more; smaller ones every SMALL_SAMPLE_S
SMALL_SAMPLE_S = 0.25  # reading 17 /proc files every 20 ms costs a small model's round a few ms of GIL
SMALL_MODEL_BYTES = 16 << 20
TREE_S = 1.0  # how often the sampler looks for new processes under a node (its worker)
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- memory --------------------------------------------------------------------------------------
def _status(pid: int | str) -> dict[str, int]:
    """The ``kB`` lines of ``/proc/PID/status`` we need, in bytes (empty if the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        return {}
    return out


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (the node's training worker), from /proc's children lists."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children", encoding="ascii") as f:
                    todo += [int(c) for c in f.read().split()]
            except OSError:
                pass
    return found


def tree_rss(pid: int, tree: list[int] | None = None) -> int:
    """RSS of ``pid`` and its descendants (``tree``, when the caller knows them); shared memory (the
    node/worker frames file, mapped by both) is counted once: anonymous and file pages summed, the
    largest shmem figure added."""
    total, shmem = 0, 0
    for p in tree if tree is not None else _descendants(pid):
        s = _status(p)
        total += s.get("RssAnon", 0) + s.get("RssFile", 0)
        shmem = max(shmem, s.get("RssShmem", 0))
    return total + shmem


def cpu_seconds(pids: list[int], *, below: bool = True) -> float:
    """User + system CPU seconds used so far by these processes and (``below``) everything below them.
    The researcher's is counted with ``below=False``: the nodes this benchmark starts are its children."""
    total = 0
    for pid in pids:
        for p in _descendants(pid) if below else [pid]:
            try:
                with open(f"/proc/{p}/stat", encoding="ascii") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
            except (OSError, ValueError, IndexError):
                pass
    return total / os.sysconf("SC_CLK_TCK")


def own_rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * PAGE


def reset_high_water_mark() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemorySampler(threading.Thread):
    """Samples this process's RSS and each node's (node + worker) every ``interval`` s, keeping the peaks."""

    def __init__(self, node_pids: list[int], interval: float = SAMPLE_S) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.node_pids = node_pids
        self.interval = interval
        self.researcher_peak = 0
        self.node_peaks = dict.fromkeys(node_pids, 0)
        self._done = threading.Event()

    def sample(self, trees: dict[int, list[int]] | None = None) -> None:
        self.researcher_peak = max(self.researcher_peak, own_rss())
        for pid in self.node_pids:
            self.node_peaks[pid] = max(self.node_peaks[pid], tree_rss(pid, (trees or {}).get(pid)))

    def run(self) -> None:
        # the process trees are walked once a second, not at every sample: walking every thread's
        # children list of 8 nodes and their workers each 20 ms took a third of a core and the
        # researcher's GIL with it, slowing the very rounds it measured (small models at N = 8)
        trees: dict[int, list[int]] = {}
        walked = 0.0
        while not self._done.wait(self.interval):
            if time.monotonic() - walked > TREE_S:
                trees, walked = {pid: _descendants(pid) for pid in self.node_pids}, time.monotonic()
            self.sample(trees)

    def stop(self) -> None:
        self._done.set()
        self.join(5)
        self.sample()


# -- rounds --------------------------------------------------------------------------------------
class TimedFedAvg(FedAvg):
    """FedAvg that notes when each reply is handed to it, to time the researcher's tail of a round."""

    def __init__(self) -> None:
        super().__init__()
        self.last_reply = 0.0

    def add(self, node_id: str, params: Mapping[str, np.ndarray], n_samples: int,
            aux_vars: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> None:
        self.last_reply = time.perf_counter()
        super().add(node_id, params, n_samples, aux_vars)

    def add_streamed(self, node_id: str, layout: Mapping[str, tuple[tuple[int, ...], np.dtype]], n_samples: int,
                     chunks: Iterable[tuple[str, int, np.ndarray]], *, lock: Any = None) -> None:
        """A reply pulled in chunks (large models): it is all here when its last chunk is."""

        def timed() -> Iterator[tuple[str, int, np.ndarray]]:
            for chunk in chunks:
                self.last_reply = time.perf_counter()
                yield chunk

        super().add_streamed(node_id, layout, n_samples, timed(), lock=lock)


@dataclass
class Result:
    times: list[float]
    tails: list[float]
    compute: float
    n_bytes: int
    researcher_peak: int  # bytes over the baseline
    node_peak: int
    sealed: tuple[int, int] | None = None  # messages out, in over the bulk path
    failed: int = 0  # node replies of the timed rounds that did not come (their round still counts)
    cpu: tuple[float, float] = (0.0, 0.0)  # CPU seconds per timed round: researcher, all nodes with their workers


def start_nodes(root: Path, n: int, address: str, researcher_key: Path | None = None
                ) -> tuple[list[Path], list[subprocess.Popen[bytes]], Path | None]:
    """N started nodes and, when keyed, the allowlist file naming their public keys."""
    csv = root / "one-row.csv"
    pd.DataFrame({"x": [0.0]}).to_csv(csv, index=False)
    dirs, procs, lines = [], [], []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for i in range(n):
        config = init_node_dir(root / f"{address.rsplit(':', 1)[1]}-node-{i}", f"bench-{i}", address,
                               researcher_key=str(researcher_key) if researcher_key is not None else None)
        DatasetRegistry(config.db_path).add("bench", ["bench"], "csv", str(csv))
        dirs.append(config.directory)
        if researcher_key is not None:
            lines.append(f"{read_public_key(str(config.public_key_path))} bench-{i} ({config.node_id})")
        procs.append(subprocess.Popen([sys.executable, "-m", "fedlab", "node", "start", str(config.directory)],
                                      stderr=subprocess.DEVNULL, env=env))
    allowlist = None
    if researcher_key is not None:
        allowlist = root / f"{address.rsplit(':', 1)[1]}-allowlist.txt"
        allowlist.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dirs, procs, allowlist


def approve(dirs: list[Path], plan_id: str) -> None:
    for d in dirs:
        subprocess.run([sys.executable, "-m", "fedlab", "node", "plan", "approve", str(d), plan_id],
                       check=True, stdout=subprocess.DEVNULL)


def bench_rounds(root: Path, n: int, model: str, rounds: int, mode: str = "plain") -> Result:
    """``mode``: plain, curve (encrypted, bulk path off) or bulk (encrypted, bulk path on)."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    public = secret = None
    if mode != "plain":
        public, secret = create_keypair(root / f"{port}-keys", "researcher")
    # the allowlist must exist before the keyed Researcher starts: write it before the nodes connect
    dirs, procs, allowlist = start_nodes(root, n, address, public)
    options: dict[str, Any] = {}
    if secret is not None and allowlist is not None:
        options["transport"] = ZmqResearcherTransport(
            address, key=load_keypair(secret), allowlist=Allowlist(allowlist),
            bulk=f"tcp://127.0.0.1:{free_port()}" if mode == "bulk" else False)
    n_in, n_out = MODELS[model]
    try:
        with Researcher(address, **options) as researcher:
            researcher.wait_for_nodes(n, timeout=60)
            aggregator = TimedFedAvg()
            exp = Experiment(researcher, tags=["bench"], training_plan=PLAN, plan_class="BenchPlan",
                             model_args={"n_in": n_in, "n_out": n_out},
                             training_args={"num_updates": 1, "batch_size": 1, "optimizer_args": {"lr": 0.0}},
                             rounds=rounds + 1, aggregator=aggregator, round_timeout=300)
            exp.approve("benchmark plan")
            approve(dirs, exp.plan_id)
            researcher_base = own_rss()
            exp.run_once()  # warm-up: torch and the plan load on the nodes, their workers start
            exp.round_timeout = 60.0  # a timed round that loses a reply says so within a minute
            model_bytes = sum(int(np.asarray(p).nbytes) for p in exp.params.values())
            sampler = MemorySampler([p.pid for p in procs],
                                    SAMPLE_S if model_bytes >= SMALL_MODEL_BYTES else SMALL_SAMPLE_S)
            sampler.sample()
            node_base = dict(sampler.node_peaks)
            sampler.researcher_peak = 0
            sampler.node_peaks = dict.fromkeys(node_base, 0)
            hwm = reset_high_water_mark()
            sampler.start()
            times, tails = [], []
            cpu_before = (cpu_seconds([os.getpid()], below=False), cpu_seconds([p.pid for p in procs]))
            try:
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    exp._run_round()  # a round as Experiment.run does it (run_once also builds its rows' DataFrame)
                    t1 = time.perf_counter()
                    times.append(t1 - t0)
                    tails.append(t1 - aggregator.last_reply)
            finally:
                sampler.stop()
            cpu = ((cpu_seconds([os.getpid()], below=False) - cpu_before[0]) / rounds,
                   (cpu_seconds([p.pid for p in procs]) - cpu_before[1]) / rounds)
            researcher_peak = max(sampler.researcher_peak, _status("self").get("VmHWM", 0) if hwm else 0)
            history = exp.history
            failed = history[(history["status"] != "ok") & (history["round"] > 1)]
            if (history[history["round"] == 1]["status"] != "ok").any():
                raise RuntimeError(f"the warm-up round failed:\n{history}")
            n_bytes = sum(int(np.asarray(p).nbytes) for p in exp.params.values())
            compute = float(history[history["round"] > 1]["compute_seconds"].median())
            bulk = getattr(options.get("transport"), "bulk", None)
            return Result(times, tails, compute, n_bytes, researcher_peak - researcher_base,
                          max(sampler.node_peaks[p] - node_base[p] for p in node_base),
                          (bulk.sealed_out, bulk.sealed_in) if bulk is not None else None, len(failed), cpu)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


# -- the table -----------------------------------------------------------------------------------
HEADER = (f"{'model':>6} {'MB':>6} {'nodes':>5} {'mode':>5} | {'round ms: min':>13} {'median':>7} {'max':>7} | "
          f"{'floor ms':>8} {'ratio':>5} | {'tail ms':>7} {'compute ms':>10} | {'researcher MB':>13} {'x':>5} | "
          f"{'node MB':>7} {'x':>5} | {'cpu ms: res':>11} {'nodes':>6} | {'vs plain':>8} {'sealed':>9}")


def row(model: str, n: int, mode: str, r: Result, floor: float, plain: Result | None) -> str:
    mb = r.n_bytes / 1e6
    ms = [t * 1e3 for t in r.times]
    vs = f"{statistics.median(r.times) / statistics.median(plain.times):>8.2f}" if plain is not None else f"{'':>8}"
    sealed = f"{r.sealed[0]}/{r.sealed[1]}" if r.sealed is not None else ""
    lost = f"  {r.failed} node round(s) not answered (their rounds waited 60 s)" if r.failed else ""
    return (f"{model:>6} {mb:>6.1f} {n:>5} {mode:>5} | {min(ms):>13.1f} {statistics.median(ms):>7.1f} "
            f"{max(ms):>7.1f} | {floor * 1e3:>8.1f} {statistics.median(r.times) / floor:>5.2f} | "
            f"{statistics.median(r.tails) * 1e3:>7.1f} {r.compute * 1e3:>10.1f} | "
            f"{r.researcher_peak / 1e6:>13.1f} {r.researcher_peak / r.n_bytes:>5.2f} | "
            f"{r.node_peak / 1e6:>7.1f} {r.node_peak / r.n_bytes:>5.2f} | {r.cpu[0] * 1e3:>11.0f} "
            f"{r.cpu[1] * 1e3:>6.0f} | {vs} {sealed:>9}{lost}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["small", "large"])
    parser.add_argument("--encrypted", action="store_true",
                        help="also run each configuration with CurveZMQ keys, with the bulk path off (curve) and on "
                             "(bulk), and print each / plain")
    args = parser.parse_args()
    logging.getLogger("fedlab").setLevel(logging.ERROR)  # the plain runs' INSECURE warning would break the table
    print(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for n in args.nodes:
                plain = bench_rounds(Path(tmp), n, model, args.rounds)
                floor = bench_raw(n, {plain.n_bytes: bytes(plain.n_bytes)}, args.rounds)[plain.n_bytes]
                print(row(model, n, "plain", plain, floor, None), flush=True)
                if args.encrypted:
                    for mode in ("curve", "bulk"):
                        encrypted = bench_rounds(Path(tmp), n, model, args.rounds, mode)
                        print(row(model, n, mode, encrypted, floor, plain), flush=True)


if __name__ == "__main__":
    main()
