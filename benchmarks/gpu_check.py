"""The same training on the CPU and on a GPU, through real `fedlab node start` processes: round times, accuracy.

Two federations of real nodes hold the same data: in one every node's config.toml says ``device = "cpu"``,
in the other ``device = "cuda"``. The same experiment (plan, seed, arguments, ``use_gpu=True``) runs on the
CPU nodes, then on the GPU nodes, one after the other, so they do not compete for the machine. Printed per
federation: the device the history reports for every node and round (and any note), the first round's time
(it imports torch on the nodes and, on the GPU, sets up CUDA), the median of the other rounds (researcher
side, ``total_seconds``, and node side, ``compute_seconds``), the final model's accuracy on held-out rows,
and how far the two final models are apart (GPU rounds agree with CPU rounds to rounding, not to the bit).

Data: scikit-learn's bundled 8x8 digits (1,797 images), 20% held out, the rest over ``--sites`` nodes; each
node's rows are repeated ``--copies`` times with a little pixel noise (std 0.5 of 16 levels) so that a round
has enough work to time. The plan is an MLP (64 -> hidden -> hidden -> 10, ReLU), SGD with momentum.

On a machine where torch sees no CUDA GPU it says so and exits with status 2 without starting a node
(``--cpu-only`` then runs the CPU half alone, to check the script itself).

    .venv/bin/python benchmarks/gpu_check.py [--rounds 5] [--epochs 2] [--hidden 1024] [--copies 20]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fedlab import Experiment, Researcher, TorchTrainingPlan
from fedlab.node.config import init_node_dir
from fedlab.node.registry import DatasetRegistry

NO_GPU = 2  # the exit status where torch sees no CUDA GPU


class DigitsMLP(TorchTrainingPlan):
    """A two-hidden-layer MLP on the 64 pixels (scaled to [0, 1])."""

    def init_model(self, model_args):
        from torch import nn

        hidden = model_args["hidden"]
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, 10))

    def init_optimizer(self, optimizer_args):
        import torch

        return torch.optim.SGD(self.model.parameters(), **{"lr": 0.05, "momentum": 0.9, **optimizer_args})

    def training_data(self, dataset):
        pixels = dataset.drop(columns="target").to_numpy("float32") / 16.0
        return pixels, dataset["target"].to_numpy("int64")

    def training_step(self, data, target):
        import torch.nn.functional as F

        return F.cross_entropy(self.model(data), target)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def digits(sites: int, copies: int, seed: int) -> tuple[list[pd.DataFrame], pd.DataFrame]:
    """The sites' rows (each repeated ``copies`` times with pixel noise) and the held-out rows."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    frame = pd.DataFrame(bunch.data, columns=[f"p{i}" for i in range(64)])
    frame["target"] = bunch.target
    pool, test = train_test_split(frame, test_size=0.2, stratify=frame["target"], random_state=seed)
    rng = np.random.default_rng(seed)
    shuffled = pool.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    cuts = np.linspace(0, len(shuffled), sites + 1).astype(int)
    parts = [shuffled.iloc[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    out = []
    for part in parts:
        tiled = pd.concat([part] * copies, ignore_index=True)
        pixels = tiled.columns[:-1]
        tiled[pixels] = np.clip(tiled[pixels].to_numpy() + rng.normal(0, 0.5, (len(tiled), 64)), 0, 16)
        out.append(tiled)
    return out, test.reset_index(drop=True)


def start_nodes(root: Path, address: str, tag: str, device: str, sites: list[pd.DataFrame], threads: int
                ) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i, site in enumerate(sites):
        name = f"{tag}-{chr(97 + i)}"
        config = init_node_dir(root / name, name, address)
        text = config.config_path.read_text()
        text = text.replace("require_approval = true", "require_approval = false")
        text = text.replace("training_threads = 0", f"training_threads = {threads}")
        text = text.replace('device = "auto"', f'device = "{device}"')
        config.config_path.write_text(text)
        csv = root / f"{name}.csv"
        site.to_csv(csv, index=False)
        DatasetRegistry(config.db_path).add("digits", [tag], "csv", str(csv))
        procs.append(subprocess.Popen([sys.executable, "-m", "fedlab", "node", "start", str(config.directory)],
                                      stderr=subprocess.DEVNULL))
    return procs


def accuracy(exp: Experiment, test: pd.DataFrame) -> float:
    import torch

    x = torch.tensor(test.drop(columns="target").to_numpy("float32") / 16.0)
    with torch.no_grad():
        predicted = exp.model()(x).argmax(1).numpy()
    return float((predicted == test["target"].to_numpy()).mean())


def run(researcher: Researcher, tag: str, args: argparse.Namespace, test: pd.DataFrame) -> dict:
    training = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed, "use_gpu": True}
    exp = Experiment(researcher, [tag], DigitsMLP, model_args={"hidden": args.hidden}, training_args=training,
                     rounds=args.rounds, round_timeout=600, disconnect_grace=120)
    started = time.perf_counter()
    history = exp.run()
    wall = time.perf_counter() - started
    if not (history["status"] == "ok").all():
        raise SystemExit(f"a round on the {tag} nodes did not go through:\n"
                         f"{history[['round', 'node', 'status', 'reason']].to_string()}")
    per_round = history.groupby("round").agg(total=("total_seconds", "max"), compute=("compute_seconds", "max"))
    notes = sorted({n for n in history.get("device_note", pd.Series(dtype=str)) if n})
    return {"devices": sorted(set(history["device"])), "notes": notes, "first": per_round.iloc[0],
            "rest": per_round.iloc[1:].median() if len(per_round) > 1 else None, "wall": wall,
            "accuracy": accuracy(exp, test), "params": {k: np.array(v) for k, v in exp.params.items()},
            "rows": int(history[history["round"] == 1]["n_samples"].sum())}


def report(tag: str, figures: dict) -> None:
    first, rest = figures["first"], figures["rest"]
    notes = figures["notes"]
    print(f"{tag}: trained on {', '.join(figures['devices'])}" +
          (f"; {len(notes)} node note{'s' if len(notes) > 1 else ''}, e.g. {notes[0]!r}" if notes else ""))
    print(f"  round 1 (torch import{', CUDA set-up' if tag == 'gpu' else ''}): {first['total']:.2f} s, "
          f"node compute {first['compute']:.2f} s")
    if rest is not None:
        print(f"  later rounds, median: {rest['total']:.2f} s, node compute {rest['compute']:.2f} s")
    print(f"  all rounds: {figures['wall']:.2f} s; final accuracy on held-out rows {figures['accuracy']:.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-only", action="store_true", help="without a GPU, run the CPU half alone")
    args = parser.parse_args()

    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"no CUDA GPU found: torch {torch.__version__} ({build}) sees none, so there is nothing to compare "
              "the CPU with. Run this on a machine with an NVIDIA GPU and a CUDA build of torch.")
        if not args.cpu_only:
            return NO_GPU
    else:
        print(f"GPU: {torch.cuda.get_device_name(0)} ({gpus} seen); torch {torch.__version__}, CUDA "
              f"{torch.version.cuda}")
    sites, test = digits(args.sites, args.copies, args.seed)
    threads = max(1, (os.cpu_count() or 1) // args.sites)
    print(f"digits: {sum(len(s) for s in sites)} training rows ({args.copies} noisy copies) over {args.sites} "
          f"nodes, {len(test)} held out; MLP 64-{args.hidden}-{args.hidden}-10, {args.rounds} rounds x "
          f"{args.epochs} epochs, batch {args.batch_size}; {threads} torch threads per CPU node")
    address = f"tcp://127.0.0.1:{free_port()}"
    tags = ["cpu"] + (["gpu"] if gpus else [])
    with tempfile.TemporaryDirectory() as tmp:
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for tag in tags:
                procs += start_nodes(Path(tmp), address, tag, "cuda" if tag == "gpu" else "cpu", sites, threads)
            with Researcher(address) as researcher:
                researcher.wait_for_nodes(len(procs), timeout=120)
                results = {tag: run(researcher, tag, args, test) for tag in tags}
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(60)
    for tag in tags:
        report(tag, results[tag])
    if "gpu" in results:
        cpu, gpu = results["cpu"], results["gpu"]
        apart = max(float(np.abs(cpu["params"][k] - gpu["params"][k]).max()) for k in cpu["params"])
        if cpu["rest"] is not None and gpu["rest"] is not None:
            print(f"later rounds, GPU vs CPU: {cpu['rest']['total'] / gpu['rest']['total']:.2f}x faster "
                  f"(node compute {cpu['rest']['compute'] / gpu['rest']['compute']:.2f}x)")
        print(f"final models: largest difference of a parameter {apart:.2e}; accuracy GPU "
              f"{gpu['accuracy']:.4f}, CPU {cpu['accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
