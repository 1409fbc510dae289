"""FedAvg with and without local DP (DP-SGD through Opacus) on the breast cancer data over 3 real nodes.

scikit-learn's bundled Wisconsin breast cancer data: 20% held out here (stratified, never on a node), the
rest split over 3 `fedlab node start` processes like the demo's sites (``fedlab.demo.split_like_sites``:
sizes fall off site by site and the malignant share differs). The plan is a logistic regression on the
30 features, each put on a log scale and mapped to [-1, 1] with the min and max that the dataset's own
documentation publishes (sklearn's ``DESCR``): fixed, public constants, never read from the rows, as
DP requires (the demo notebook's plan standardizes with BatchNorm, whose running statistics are
computed from the rows without noise, so Opacus refuses it).

Both runs use the same plan, seed, batch size, learning rate and rounds; the DP run adds
``dp_args = {"type": "local", "sigma": ..., "clip": ...}``. Each node accounts its rounds with Opacus'
RDP accountant at the experiment's δ (by default a tenth of the node's δ, 1e-6 / 10), and the figures
printed are the nodes' own (the history's per-round ε, summed; the balance in each node's node.db).
Target (issue 16): total ε <= 8 on every node over the run, DP accuracy within 10 points of non-DP.
The DP run is repeated (``--repeats``, each a new experiment spending from the nodes' budgets, which
are set to 8 per repeat); the non-DP run is deterministic and runs once.

    .venv/bin/python benchmarks/dp_training.py [--rounds 10] [--sigma 1.5] [--clip 1.0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from fedlab import Experiment, Researcher, TorchTrainingPlan
from fedlab.demo import split_like_sites
from fedlab.node.config import init_node_dir
from fedlab.node.dp_ledger import DPLedger
from fedlab.node.registry import DatasetRegistry
from fedlab.privacy.dp_rules import DPRules

SITES = ("hospital-a", "hospital-b", "hospital-c")
TARGET_EPSILON, TARGET_POINTS = 8.0, 10.0


class CancerLogReg(TorchTrainingPlan):
    """Logistic regression on log-scaled features mapped to [-1, 1] by public bounds (model_args lo, hi)."""

    def init_model(self, model_args):
        from torch import nn

        self.lo, self.hi = model_args["lo"], model_args["hi"]  # plain lists: init_model may run on torch's meta device
        return nn.Linear(len(self.lo), 1)

    def training_data(self, dataset):
        import torch

        x = torch.log1p(torch.tensor(dataset.drop(columns="target").to_numpy("float32")))
        lo, hi = torch.log1p(torch.tensor(self.lo)), torch.log1p(torch.tensor(self.hi))
        return 2 * (x - lo) / (hi - lo) - 1, dataset["target"].to_numpy("float32")

    def training_step(self, data, target):
        import torch.nn.functional as F

        return F.binary_cross_entropy_with_logits(self.model(data).squeeze(1), target)


def public_bounds() -> tuple[list[float], list[float]]:
    """Each feature's min and max from the dataset's published summary table, in feature order."""
    from sklearn.datasets import load_breast_cancer

    rows = re.findall(r"^[a-z ]+\((?:mean|standard error|worst)\):\s+([0-9.]+)\s+([0-9.]+)\s*$",
                      load_breast_cancer().DESCR, re.MULTILINE)
    if len(rows) != 30:
        raise SystemExit(f"expected 30 rows in the breast cancer summary table, found {len(rows)}")
    return [float(lo) for lo, _ in rows], [float(hi) for _, hi in rows]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accuracy(exp: Experiment, test: pd.DataFrame) -> float:
    """The global model's accuracy on the held-out rows, with the plan's own feature mapping."""
    import torch

    plan = CancerLogReg()
    plan.init_model(exp.model_args)
    x, y = plan.training_data(test)
    with torch.no_grad():
        logits = exp.model()(x).squeeze(1)
    return float(((logits > 0).numpy() == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--sigma", type=float, default=1.5)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="DP runs (each a new experiment)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    frame = load_breast_cancer(as_frame=True).frame
    pool, test = train_test_split(frame, test_size=0.2, stratify=frame["target"], random_state=args.seed)
    sites = split_like_sites(pool.reset_index(drop=True), len(SITES))
    lo, hi = public_bounds()
    address = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        procs, dbs = [], {}
        for name, site in zip(SITES, sites, strict=True):
            config = init_node_dir(Path(tmp) / name, name, address)
            text = config.config_path.read_text().replace("require_approval = true", "require_approval = false")
            text = text.replace("training_threads = 0", "training_threads = 1")
            text = text.replace("epsilon_budget = 10.0", f"epsilon_budget = {TARGET_EPSILON * args.repeats}")
            config.config_path.write_text(text)
            site.to_csv(Path(tmp) / f"{name}.csv", index=False)
            DatasetRegistry(config.db_path).add("breast-cancer", ["breast-cancer"], "csv", Path(tmp) / f"{name}.csv")
            dbs[name] = config.db_path
            procs.append(subprocess.Popen([sys.executable, "-m", "fedlab", "node", "start", str(config.directory)],
                                          stderr=subprocess.DEVNULL, env=env))
        try:
            with Researcher(address) as researcher:
                researcher.wait_for_nodes(len(SITES), timeout=120)
                training = {"epochs": args.epochs, "batch_size": args.batch_size, "optimizer_args": {"lr": args.lr},
                            "seed": args.seed}
                options = {"model_args": {"lo": lo, "hi": hi}, "rounds": args.rounds, "round_timeout": 300,
                           "disconnect_grace": 60}
                plain = Experiment(researcher, ["breast-cancer"], CancerLogReg, training_args=training, **options)
                plain.run()
                plain_accuracy = accuracy(plain, test)
                dp_args = {"type": "local", "sigma": args.sigma, "clip": args.clip}
                runs = []
                for _ in range(args.repeats):
                    exp = Experiment(researcher, ["breast-cancer"], CancerLogReg,
                                     training_args={**training, "dp_args": dp_args}, **options)
                    history = exp.run()
                    if not (history["status"] == "ok").all():
                        rows = history[["round", "node", "status", "reason"]]
                        raise SystemExit(f"a DP round did not go through:\n{rows}")
                    privacy = exp.privacy()  # per node: the rounds' ε (their composed ε on the node) and δ
                    runs.append((accuracy(exp, test), privacy["epsilon"].sort_index(), privacy["delta"]))
                names = researcher._names()
                sizes = {names.get(n, n): int(plain.history[plain.history.node_id == n]["n_samples"].iloc[0])
                         for n in plain.node_ids}
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(60)
        ledger = {name: sum(r.epsilon_spent for r in DPLedger(db, DPRules()).rows()) for name, db in dbs.items()}

    print(f"breast cancer: {len(pool)} rows over {len(SITES)} nodes {dict(sizes)}, {len(test)} held out")
    print(f"plan: logistic regression, {args.rounds} rounds x {args.epochs} epoch(s), batch {args.batch_size}, "
          f"lr {args.lr}; DP: local, sigma {args.sigma}, clip {args.clip}")
    print(f"non-DP accuracy: {plain_accuracy:.4f}")
    dp_accuracies = [a for a, _, _ in runs]
    for i, (acc, eps, delta) in enumerate(runs, 1):
        per_node = ", ".join(f"{node} {eps[node]:.3f}" for node in eps.index)
        print(f"DP run {i}: accuracy {acc:.4f}; total epsilon per node {per_node} (delta {delta.max():.1e})")
    worst_eps = max(float(e.max()) for _, e, _ in runs)
    mean_dp = float(np.mean(dp_accuracies))
    gap = 100 * (plain_accuracy - min(dp_accuracies))
    print(f"DP accuracy mean {mean_dp:.4f}, worst {min(dp_accuracies):.4f}; difference to non-DP: "
          f"{100 * (plain_accuracy - mean_dp):.1f} points on average, {gap:.1f} at worst")
    print("node ledgers (node.db), all runs together: " + ", ".join(f"{k} {v:.3f}" for k, v in ledger.items()))
    met = worst_eps <= TARGET_EPSILON and gap <= TARGET_POINTS
    print(f"target: epsilon <= {TARGET_EPSILON:g} per node per run (worst {worst_eps:.3f}) and within "
          f"{TARGET_POINTS:g} points (worst {gap:.1f}) -> {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
