"""What handing a round to the node's training worker process costs, without the network.

Runs `benchmarks/rounds.py`'s plan (one linear layer, one optimizer step on one row, learning
rate 0) through a real worker process (``fedlab.node.plan_worker.PlanWorker``), as a node does,
and prints the median time of a round beside the median compute time the worker reports: the
difference ("overhead") is moving the parameters to the worker and the result back (shared
memory files, the messages, the hand-overs between the two processes). Medians after one
warm-up round.

    .venv/bin/python benchmarks/worker.py [--models small large] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
from rounds import MODELS, PLAN  # benchmarks/ is on sys.path when run as a script

from fedlab.node.plan_worker import PlanWorker
from fedlab.training.source import plan_id
from fedlab.training.tensors import pack_named
from fedlab.training.worker_wire import RoundDone, RunRound

SOURCE = "import numpy as np\nfrom torch import nn\nfrom fedlab.training import TorchTrainingPlan\n" + PLAN


def bench(model: str, rounds: int, csv: Path) -> tuple[float, float, float]:
    """Median round, compute and overhead (round minus compute) in seconds."""
    n_in, n_out = MODELS[model]
    specs, frames = pack_named({"weight": np.zeros((n_out, n_in), np.float32), "bias": np.zeros(n_out, np.float32)})
    worker = PlanWorker(node_name="bench", threads=1)
    times, computes = [], []
    try:
        for r in range(rounds + 1):
            job = RunRound(job_id=f"round-{r}", n_buffers=len(frames), plan_id=plan_id(SOURCE), plan_source=SOURCE,
                           plan_class="BenchPlan", dataset_id="bench", data_type="csv", data_path=str(csv),
                           round=r + 1, model_args={"n_in": n_in, "n_out": n_out}, params=specs,
                           training_args={"num_updates": 1, "batch_size": 1, "optimizer_args": {"lr": 0.0}})
            started = time.perf_counter()
            result, out = worker.run(job, frames, timeout=300, cancelled=threading.Event(), on_progress=lambda p: None)
            times.append(time.perf_counter() - started)
            assert isinstance(result, RoundDone), result
            computes.append(result.compute_seconds)
            del out
    finally:
        worker.close()
    overheads = [t - c for t, c in zip(times[1:], computes[1:], strict=True)]
    return statistics.median(times[1:]), statistics.median(computes[1:]), statistics.median(overheads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["small", "large"])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as benchmarks/rounds.py's nodes (inherited by the worker)
    print(f"{'model':>6} {'MB':>7} {'round ms':>9} {'compute ms':>11} {'overhead ms':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "one-row.csv"
        pd.DataFrame({"x": [0.0]}).to_csv(csv, index=False)
        for model in args.models:
            n_in, n_out = MODELS[model]
            round_s, compute_s, overhead_s = bench(model, args.rounds, csv)
            print(f"{model:>6} {(n_in * n_out + n_out) * 4 / 1e6:>7.1f} {round_s * 1e3:>9.1f} {compute_s * 1e3:>11.1f} "
                  f"{overhead_s * 1e3:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
