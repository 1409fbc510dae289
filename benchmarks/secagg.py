"""Secure aggregation against the plain round, side by side in one run, with real node processes.

For each model (0.4 MB and 100 MB, as in ``rounds.py``: one linear layer, one optimizer step on
one row, so the round is all transfer and aggregation) and each N, the same federation runs a
plain Experiment and a secure one (``secagg=True``), one warm-up round each, then their timed
rounds alternate (plain, secure, secure32, plain, ...) so that all see the same machine:
``secure`` is the default (64-bit words), ``secure32`` has ``ring_bits=32`` (two values per word,
``clip`` 8). Then a stats request (count, mean, std, a histogram, value counts) over a 50,000-row
table per node, plain and secure, alternating the same way.

Columns: min / median / max ms of the timed rounds or requests, and each secure mode's median over
the plain one's. Targets (issue 15): the 0.4 MB secure round at N = 8 within 2 x the plain one; the
100 MB secure round within 1.5 x.

    .venv/bin/python benchmarks/secagg.py [--nodes 2 8] [--rounds 5] [--models small large] [--no-stats]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from rounds import MODELS, PLAN, approve, start_nodes  # benchmarks/ is on sys.path when run as a script
from transport import free_port

from fedlab import Experiment, Researcher
from fedlab.node.registry import DatasetRegistry

STATS_ROWS = 50_000
EDGES = [-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0]


def _alternate(runs: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(n):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return times


SECURE_MODES = {"secure": {}, "secure32": {"ring_bits": 32, "clip": 8.0}}  # mode: secagg_arguments


def _line(what: str, n: int, times: dict[str, list[float]]) -> str:
    cells = []
    for name, values in times.items():
        ms = [t * 1e3 for t in values]
        cells.append(f"{name:>8} {min(ms):8.1f} {statistics.median(ms):8.1f} {max(ms):8.1f}")
    plain = statistics.median(times["plain"])
    ratios = " ".join(f"{statistics.median(v) / plain:6.2f}" for k, v in times.items() if k != "plain")
    return f"{what:>22} {n:>5} | {' | '.join(cells)} | {ratios}"


def bench(root: Path, n: int, models: list[str], rounds: int, stats: bool) -> list[str]:
    address = f"tcp://127.0.0.1:{free_port()}"
    dirs, procs, _ = start_nodes(root, n, address)
    rng = np.random.default_rng(n)
    for i, d in enumerate(dirs):
        csv = root / f"{address.rsplit(':', 1)[1]}-stats-{i}.csv"
        pd.DataFrame({"x": rng.normal(size=STATS_ROWS), "y": rng.normal(5, 2, size=STATS_ROWS),
                      "grade": rng.choice(["a", "b", "c", "d"], size=STATS_ROWS)}).to_csv(csv, index=False)
        DatasetRegistry(d / "node.db").add("table", ["bench-stats"], "csv", str(csv))
    lines = []
    try:
        with Researcher(address) as researcher:
            researcher.wait_for_nodes(n, timeout=60)
            for model in models:
                n_in, n_out = MODELS[model]
                exps = {}
                for mode in ("plain", *SECURE_MODES):
                    exps[mode] = Experiment(
                        researcher, tags=["bench"], training_plan=PLAN, plan_class="BenchPlan",
                        model_args={"n_in": n_in, "n_out": n_out}, rounds=rounds + 1, round_timeout=300,
                        training_args={"num_updates": 1, "batch_size": 1, "optimizer_args": {"lr": 0.0}},
                        secagg=mode != "plain", secagg_arguments=SECURE_MODES.get(mode))
                exps["plain"].approve("benchmark plan")
                approve(dirs, exps["plain"].plan_id)
                for exp in exps.values():
                    exp.run_once()  # warm-up
                times = _alternate({m: e.run_once for m, e in exps.items()}, rounds)
                for exp in exps.values():
                    assert (exp.history["status"] == "ok").all(), exp.history
                mb = sum(int(np.asarray(p).nbytes) for p in exps["plain"].params.values()) / 1e6
                lines.append(_line(f"round {mb:.1f} MB", n, times))
                print(lines[-1], flush=True)
            if stats:
                fds = researcher.search(["bench-stats"])
                kw = {"columns": ["x", "y", "grade"], "stats_args": {"x": {"histogram": {"edges": EDGES}}}}
                names = ["count", "mean", "std", "value_counts"]
                runs = {"plain": lambda: researcher.stats(fds, names, **kw),
                        "secure": lambda: researcher.stats(fds, names, secagg=True, **kw)}
                for run in runs.values():
                    run()  # warm-up
                lines.append(_line(f"stats {STATS_ROWS} rows", n, _alternate(runs, rounds)))
                print(lines[-1], flush=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["small", "large"])
    parser.add_argument("--no-stats", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    modes = ["plain", *SECURE_MODES]
    header = (f"{'':>22} {'nodes':>5} | " + " | ".join(f"{m + ' ms: min':>17} {'median':>8} {'max':>8}" for m in modes)
              + " | " + " ".join(f"{m}/plain" for m in modes[1:]))
    print(header, flush=True)
    lines = []
    with tempfile.TemporaryDirectory(prefix="fedlab-secagg-bench-") as tmp:
        for n in args.nodes:
            lines += bench(Path(tmp), n, args.models, args.rounds, not args.no_stats)
    print("\n" + header + "\n" + "\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
