"""Time of one training round with near-zero local compute, beside the raw transfer floor.

A round sends the global parameters to N real `fedlab node start` processes, each node loads
them into its model, takes one optimizer step on a single row (near-zero compute), and sends
its parameters back; the researcher aggregates them (FedAvg) as they arrive. The floor is
the same bytes moved by bare pyzmq in the same run: a ROUTER sends the payload to N DEALER
echo processes and waits for every echo (`benchmarks/transport.py`'s baseline). Medians over
several rounds, after one warm-up round (which imports torch on the nodes and loads the plan).

Models: ~100k parameters (0.4 MB) and ~25M parameters (100 MB), as single linear layers.
Targets (issue 4): 100 MB round <= 1.5 x floor; small model at N = 8 <= 30 ms per round.
"node compute" is the median time a node spent in the plan's round (its ``compute_seconds``):
loading the parameters, one forward and backward pass and one optimizer step. For the 100 MB
model that alone is ~150 ms of CPU per node, which the floor (an echo) does not pay.

    .venv/bin/python benchmarks/rounds.py [--nodes 2 8] [--rounds 5] [--models small large]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from transport import bench_raw, free_port  # benchmarks/ is on sys.path when run as a script

from fedlab import Experiment, Researcher
from fedlab.node.config import init_node_dir
from fedlab.node.registry import DatasetRegistry

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


def start_nodes(root: Path, n: int, address: str) -> tuple[list[Path], list[subprocess.Popen[bytes]]]:
    csv = root / "one-row.csv"
    pd.DataFrame({"x": [0.0]}).to_csv(csv, index=False)
    dirs, procs = [], []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for i in range(n):
        config = init_node_dir(root / f"{address.rsplit(':', 1)[1]}-node-{i}", f"bench-{i}", address)
        DatasetRegistry(config.db_path).add("bench", ["bench"], "csv", str(csv))
        dirs.append(config.directory)
        procs.append(subprocess.Popen([sys.executable, "-m", "fedlab", "node", "start", str(config.directory)],
                                      stderr=subprocess.DEVNULL, env=env))
    return dirs, procs


def approve(dirs: list[Path], plan_id: str) -> None:
    for d in dirs:
        subprocess.run([sys.executable, "-m", "fedlab", "node", "plan", "approve", str(d), plan_id],
                       check=True, stdout=subprocess.DEVNULL)


def bench_rounds(root: Path, n: int, model: str, rounds: int) -> tuple[float, float, int]:
    address = f"tcp://127.0.0.1:{free_port()}"
    dirs, procs = start_nodes(root, n, address)
    n_in, n_out = MODELS[model]
    try:
        with Researcher(address) as researcher:
            researcher.wait_for_nodes(n, timeout=60)
            exp = Experiment(researcher, tags=["bench"], training_plan=PLAN, plan_class="BenchPlan",
                             model_args={"n_in": n_in, "n_out": n_out},
                             training_args={"num_updates": 1, "batch_size": 1, "optimizer_args": {"lr": 0.0}},
                             rounds=rounds + 1, aggregator="fedavg", round_timeout=300)
            exp.approve("benchmark plan")
            approve(dirs, exp.plan_id)
            times = []
            for _ in range(rounds + 1):
                t0 = time.perf_counter()
                exp.run_once()
                times.append(time.perf_counter() - t0)
            history = exp.history
            assert (history["status"] == "ok").all(), history[history["status"] != "ok"]
            n_bytes = sum(int(np.asarray(p).nbytes) for p in exp.params.values())
            compute = float(history[history["round"] > 1]["compute_seconds"].median())
            return statistics.median(times[1:]), compute, n_bytes
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["small", "large"])
    args = parser.parse_args()
    print(f"{'model':>6} {'params':>11} {'MB':>7} {'nodes':>5} {'round ms':>9} {'floor ms':>9} {'ratio':>6} "
          f"{'node compute ms':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for n in args.nodes:
                round_s, compute_s, n_bytes = bench_rounds(Path(tmp), n, model, args.rounds)
                floor = bench_raw(n, {n_bytes: bytes(n_bytes)}, args.rounds)[n_bytes]
                n_in, n_out = MODELS[model]
                print(f"{model:>6} {n_in * n_out + n_out:>11,} {n_bytes / 1e6:>7.1f} {n:>5} {round_s * 1e3:>9.1f} "
                      f"{floor * 1e3:>9.1f} {round_s / floor:>6.2f} {compute_s * 1e3:>16.1f}", flush=True)


if __name__ == "__main__":
    main()
