"""What handing a round to the node's training worker process costs, without the network.

Runs `benchmarks/rounds.py`'s plan (one linear layer, one optimizer step on one row, learning
rate 0) through a real worker process (``fedlab.node.plan_worker.PlanWorker``), as a node does,
and prints the median time of a round beside the median compute time the worker reports: the
difference ("overhead") is moving the parameters to the worker and the result back (shared
memory files, the messages, the hand-overs between the two processes). Medians after one
warm-up round.

Columns:
  round, compute, overhead   as above, in ms.
  copies                     the median ms per round spent in each place that copies a model's
                             bytes (or, with shared parameters, adopts them), in both processes:
                             the functions of ``COPY_SITES`` that exist in the tree under test,
                             timed by wrapping them (in the worker process through a
                             ``sitecustomize`` put on its ``PYTHONPATH``). ``-`` where a site is
                             not in that tree.
  node+worker peak           the peak memory of the two processes during the rounds, above what they
                             held before the parameters existed (the worker started, torch loaded),
                             in MB and as a multiple of the model (the baseline is taken after a round
                             of a 1 x 1 model, so that the plan and the data are loaded): sampled every ~10 ms, each
                             process's anonymous and file pages plus the largest shared-memory figure
                             (a memory file both map is counted once), and, beside it, the sum of the
                             two proportional set sizes (``Pss``, every page counted once). The
                             parameters the "node" (this process) sends stand for the frames zmq
                             received, so they count, as in a real node. ``HWM``: the sum of the
                             kernel's exact peak RSS of each process (VmHWM, reset when the baseline
                             is taken), which counts a file both map twice: an upper bound.

Run it against another tree (a copy of the code before a change) with ``PYTHONPATH=/that/tree``.

    .venv/bin/python benchmarks/worker.py [--models small large] [--rounds 7]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rounds import MODELS, PLAN  # benchmarks/ is on sys.path when run as a script

from fedlab.node.plan_worker import PlanWorker
from fedlab.training.source import plan_id
from fedlab.training.tensors import pack_named
from fedlab.training.worker_wire import RoundDone, RunRound

SOURCE = "import numpy as np\nfrom torch import nn\nfrom fedlab.training import TorchTrainingPlan\n" + PLAN
SAMPLE_S = 0.01
# (process, module, function or Class.method, column): where a tree moves a model's bytes. Sites that
# do not exist in the tree under test are skipped (the code before and after a change differs).
COPY_SITES = [
    ("node", "fedlab.training.worker_wire", "SharedArena.write", "node in"),  # frames -> memory file
    ("node", "fedlab.training.worker_wire", "SharedArena.put", "node in"),
    ("worker", "fedlab.training.convert", "load_params", "worker load"),  # memory file -> model
    ("worker", "fedlab.training.worker_wire", "SharedArena.write", "worker out"),  # model -> memory file
    ("worker", "fedlab.training.worker_wire", "LentFile.append", "worker out"),
    ("node", "fedlab.node.plan_worker", "ResultCopies.copy", "node out"),  # memory file -> node memory
]
COLUMNS = list(dict.fromkeys(column for _, _, _, column in COPY_SITES))

# Put on the worker's PYTHONPATH: wraps the worker's copy sites, appending "column seconds" lines to a file.
SITECUSTOMIZE = '''
import functools, importlib, os, time
_out = os.environ["FEDLAB_BENCH_COPIES"]
def _wrap(owner, name, column):
    original = getattr(owner, name)
    @functools.wraps(original)
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            with open(_out, "a") as f:
                f.write(f"{column}\\t{time.perf_counter() - started}\\n")
    setattr(owner, name, timed)
for _module, _where, _column in %r:
    try:
        _owner = importlib.import_module(_module)
    except ImportError:
        continue
    *_path, _name = _where.split(".")
    for _part in _path:
        _owner = getattr(_owner, _part, None)
    if _owner is not None and hasattr(_owner, _name):
        _wrap(_owner, _name, _column)
'''


# -- copies ------------------------------------------------------------------------------------------
class NodeCopies:
    """The node-side copy sites of this process, wrapped; seconds per column since the last ``take``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        for process, module, where, column in COPY_SITES:
            if process == "node":
                self._wrap(module, where, column)

    def _wrap(self, module: str, where: str, column: str) -> None:
        owner: Any = importlib.import_module(module)
        *path, name = where.split(".")
        for part in path:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, name):
            return
        original: Callable[..., Any] = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[column] += time.perf_counter() - started

        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        out = dict(self.seconds)
        self.seconds.clear()
        return out


def worker_copies(path: Path) -> dict[str, float]:
    """The worker's copy seconds per column written to ``path`` since the last call (then emptied)."""
    out: dict[str, float] = defaultdict(float)
    if path.exists():
        for line in path.read_text().splitlines():
            column, seconds = line.split("\t")
            out[column] += float(seconds)
        path.write_text("")
    return dict(out)


# -- memory ------------------------------------------------------------------------------------------
def _rss(pid: int) -> tuple[int, int]:
    """(anonymous + file pages, shared memory pages) of ``pid`` in bytes; zeros if it is gone."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem"):
                    fields[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        return 0, 0
    return fields.get("RssAnon", 0) + fields.get("RssFile", 0), fields.get("RssShmem", 0)


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def high_water_marks(pids: list[int], *, reset: bool = False) -> int:
    """The sum of the processes' peak RSS (VmHWM; a file both map counts in both); ``reset`` first
    sets each peak to the current RSS (``/proc/PID/clear_refs``, Linux >= 4.0)."""
    total = 0
    for pid in pids:
        if reset:
            with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return total


def memory(pids: list[int]) -> tuple[int, int]:
    """(RSS of ``pids`` with shared memory counted once, the sum of their Pss)."""
    own = [_rss(pid) for pid in pids]
    return sum(r for r, _ in own) + max((s for _, s in own), default=0), sum(_pss(pid) for pid in pids)


class Sampler(threading.Thread):
    def __init__(self, pids: list[int]) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.pids = pids
        self.peak = (0, 0)
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(SAMPLE_S):
            rss, pss = memory(self.pids)
            self.peak = (max(self.peak[0], rss), max(self.peak[1], pss))

    def stop(self) -> tuple[int, int]:
        self._done.set()
        self.join(5)
        return self.peak


# -- the benchmark -----------------------------------------------------------------------------------
def round_job(r: int, n_in: int, n_out: int, csv: Path) -> tuple[RunRound, list[memoryview]]:
    # filled, not np.zeros: untouched zero pages are not resident, and the frames zmq received are
    specs, frames = pack_named({"weight": np.full((n_out, n_in), 0.5, np.float32),
                                "bias": np.full(n_out, 0.5, np.float32)})
    job = RunRound(job_id=f"round-{r}", n_buffers=len(frames), plan_id=plan_id(SOURCE), plan_source=SOURCE,
                   plan_class="BenchPlan", dataset_id="bench", data_type="csv", data_path=str(csv), round=r + 1,
                   model_args={"n_in": n_in, "n_out": n_out}, params=specs,
                   training_args={"num_updates": 1, "batch_size": 1, "optimizer_args": {"lr": 0.0}})
    return job, frames


def bench(model: str, rounds: int, csv: Path, copies_file: Path, node_copies: NodeCopies) -> dict[str, Any]:
    """Medians of a round, its compute, overhead and copies in seconds; the memory peaks in bytes."""
    n_in, n_out = MODELS[model]
    worker = PlanWorker(node_name="bench", threads=1)
    times, computes, copies = [], [], []
    try:
        worker.run(*round_job(-1, 1, 1, csv), timeout=300, cancelled=threading.Event(), on_progress=lambda p: None)
        assert worker.pid is not None  # the plan and the data are loaded in it: what follows is the model's
        pids = [os.getpid(), worker.pid]
        baseline = memory(pids)
        hwm_baseline = high_water_marks(pids, reset=True)
        sampler = Sampler(pids)
        sampler.start()
        job, frames = round_job(0, n_in, n_out, csv)
        for r in range(rounds + 1):
            job.job_id, job.round = f"round-{r}", r + 1
            node_copies.take()
            worker_copies(copies_file)
            started = time.perf_counter()
            result, out = worker.run(job, frames, timeout=300, cancelled=threading.Event(), on_progress=lambda p: None)
            times.append(time.perf_counter() - started)
            assert isinstance(result, RoundDone), result
            computes.append(result.compute_seconds)
            copies.append({**node_copies.take(), **worker_copies(copies_file)})
            del out  # sent: a node's reply has left before the next round comes
        peak = sampler.stop()
        hwm = high_water_marks(pids) - hwm_baseline
    finally:
        worker.close()
    overheads = [t - c for t, c in zip(times[1:], computes[1:], strict=True)]
    return {
        "round": statistics.median(times[1:]), "compute": statistics.median(computes[1:]),
        "overhead": statistics.median(overheads),
        "copies": {c: statistics.median(r.get(c, 0.0) for r in copies[1:]) if any(c in r for r in copies) else None
                   for c in COLUMNS},
        "rss": peak[0] - baseline[0], "pss": peak[1] - baseline[1], "hwm": hwm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["small", "large"])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as benchmarks/rounds.py's nodes (inherited by the worker)
    copies_head = " ".join(f"{c:>11}" for c in COLUMNS)
    print(f"{'model':>6} {'MB':>7} {'round ms':>9} {'compute ms':>11} {'overhead ms':>12} | copies ms: {copies_head} | "
          f"node+worker peak: {'RSS MB':>7} {'x':>5} {'Pss MB':>7} {'x':>5} {'HWM MB':>7} {'x':>5}")
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "one-row.csv"
        pd.DataFrame({"x": [0.0]}).to_csv(csv, index=False)
        site = Path(tmp) / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(
            SITECUSTOMIZE % [(m, w, c) for p, m, w, c in COPY_SITES if p == "worker"])
        copies_file = Path(tmp) / "copies.tsv"
        os.environ["FEDLAB_BENCH_COPIES"] = str(copies_file)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        node_copies = NodeCopies()
        for model in args.models:
            n_in, n_out = MODELS[model]
            n_bytes = (n_in * n_out + n_out) * 4
            r = bench(model, args.rounds, csv, copies_file, node_copies)
            cells = " ".join(f"{'-':>11}" if s is None else f"{s * 1e3:>11.1f}" for s in r["copies"].values())
            print(f"{model:>6} {n_bytes / 1e6:>7.1f} {r['round'] * 1e3:>9.1f} {r['compute'] * 1e3:>11.1f} "
                  f"{r['overhead'] * 1e3:>12.1f} | {'':>10} {cells} | {'':>17} {r['rss'] / 1e6:>7.0f} "
                  f"{r['rss'] / n_bytes:>5.1f} {r['pss'] / 1e6:>7.0f} {r['pss'] / n_bytes:>5.1f} "
                  f"{r['hwm'] / 1e6:>7.0f} {r['hwm'] / n_bytes:>5.1f}", flush=True)


if __name__ == "__main__":
    main()
