"""`fedlab demo`: a small local federation on real public data, and what a researcher sees of it.

It creates one node directory per site holding part of the Wisconsin breast cancer data (it
ships inside scikit-learn, so nothing is downloaded), split unevenly the way real sites
differ: different sizes and a different share of malignant cases. It starts a real
`fedlab node start` process per site, connects a Researcher over ZeroMQ, prints the nodes
and the datasets a tag search finds, and stops everything it started. With
``--keep-running`` the nodes stay up (Ctrl-C stops them) so a notebook can connect.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fedlab.errors import FedlabConfigError, FedlabError
from fedlab.node.config import init_node_dir
from fedlab.node.registry import DatasetRegistry
from fedlab.researcher import Researcher

__all__ = ["run_demo", "split_like_sites"]

_MARKER = ".fedlab-demo"
SITE_NAMES = ["hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e", "hospital-f",
              "hospital-g", "hospital-h"]


def load_breast_cancer_frame() -> pd.DataFrame:
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError:
        raise FedlabConfigError(
            "the demo data ships with scikit-learn, which is not installed: "
            "pip install -c constraints.txt -e '.[demo]'"
        ) from None
    frame = load_breast_cancer(as_frame=True).frame
    return frame


def split_like_sites(frame: pd.DataFrame, n_sites: int, seed: int = 7) -> list[pd.DataFrame]:
    """Uneven sites: sizes fall off site by site and the malignant share differs per site."""
    rng = np.random.default_rng(seed)
    size_w = np.arange(n_sites, 0, -1, dtype=float)          # site 0 is the largest
    malignant_w = size_w * np.linspace(1.6, 0.5, n_sites)     # and a referral centre
    benign_w = size_w * np.linspace(0.6, 1.4, n_sites)
    malignant = frame["target"].to_numpy() == 0
    site = np.where(
        malignant,
        rng.choice(n_sites, size=len(frame), p=malignant_w / malignant_w.sum()),
        rng.choice(n_sites, size=len(frame), p=benign_w / benign_w.sum()),
    )
    return [frame[site == i].reset_index(drop=True) for i in range(n_sites)]


def _check_port(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise FedlabConfigError(
                f"port {port} is already in use (another demo or researcher?); stop it or pass --port"
            ) from None


def _prepare(directory: Path, n_nodes: int, address: str) -> list[Path]:
    if directory.exists():
        if not (directory / _MARKER).exists():
            raise FedlabConfigError(
                f"{directory} exists and was not made by `fedlab demo`; pass another --dir"
            )
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / _MARKER).write_text("made by fedlab demo; safe to delete\n")
    node_dirs = []
    for name, part in zip(SITE_NAMES, split_like_sites(load_breast_cancer_frame(), n_nodes), strict=False):
        node_dir = directory / name
        config = init_node_dir(node_dir, name, address)
        csv = node_dir / "breast_cancer.csv"
        part.to_csv(csv, index=False)
        DatasetRegistry(config.db_path).add(
            "breast-cancer", ["breast-cancer", "csv"], "csv", str(csv),
            description="Wisconsin diagnostic breast cancer, this site's patients")
        node_dirs.append(node_dir)
    return node_dirs


def _start_nodes(node_dirs: list[Path]) -> list[subprocess.Popen[bytes]]:
    procs = []
    for node_dir in node_dirs:
        with open(node_dir / "stderr.txt", "wb") as err:
            procs.append(subprocess.Popen([sys.executable, "-m", "fedlab", "node", "start", str(node_dir)],
                                          stdout=subprocess.DEVNULL, stderr=err))
    return procs


def _stop_nodes(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _show(address: str, n_nodes: int) -> None:
    with Researcher(address) as researcher:
        print(f"researcher {researcher.id} listening on {address}; waiting for {n_nodes} nodes ...")
        researcher.wait_for_nodes(n_nodes, timeout=60)
        print("\nnodes:")
        print(researcher.nodes().to_string(index=False))
        fds = researcher.search(["breast-cancer"])
        print("\nresearcher.search(['breast-cancer']):")
        print(fds.to_frame().drop(columns=["node_id"]).to_string(index=False))
        result = researcher.stats(fds, stats=["count", "mean", "std", "median"],
                                  columns=["mean radius", "mean texture", "mean area", "target"])
        print("\nresearcher.stats(fds, ['count', 'mean', 'std', 'median'], columns=[...]).global_stats():")
        print(result.global_stats().to_string())
        t0 = time.perf_counter()
        ping = researcher.ping()
        print(f"\nping to {len(ping.replies())} nodes and back: {1000 * (time.perf_counter() - t0):.1f} ms")


def run_demo(n_nodes: int = 3, directory: str | Path | None = None, port: int = 5555,
             keep_running: bool = False) -> int:
    if not 1 <= n_nodes <= len(SITE_NAMES):
        raise FedlabConfigError(f"--nodes must be between 1 and {len(SITE_NAMES)}, got {n_nodes}")
    root = Path(directory or "demo-federation").resolve()
    address = f"tcp://127.0.0.1:{port}"
    _check_port(port)
    node_dirs = _prepare(root, n_nodes, address)
    print(f"created {n_nodes} nodes in {root}")
    procs = _start_nodes(node_dirs)
    try:
        _show(address, n_nodes)
        if keep_running:
            print(f"\nnodes keep running; in Python: fedlab.Researcher({address!r}). Ctrl-C stops them.")
            while all(p.poll() is None for p in procs):
                time.sleep(0.5)
            raise FedlabError("a demo node stopped unexpectedly; see its node.log in " + str(root))
    except KeyboardInterrupt:
        print("\nstopping the demo nodes")
    finally:
        _stop_nodes(procs)
    return 0
