"""Real node processes on loopback for integration tests: `fedlab node start` as a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from fedlab.node.config import init_node_dir
from fedlab.node.registry import DatasetRegistry

HEARTBEAT = 0.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def breast_cancer_splits(n: int = 3) -> list[pd.DataFrame]:
    """The Wisconsin breast cancer data (shipped with scikit-learn), split unevenly like real sites."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    sizes = [len(frame) * w // sum(range(1, n + 1)) for w in range(1, n + 1)]
    sizes[-1] = len(frame) - sum(sizes[:-1])
    parts, start = [], 0
    for size in sizes:
        parts.append(frame.iloc[start:start + size].reset_index(drop=True))
        start += size
    return parts


class NodeProcess:
    """One node directory and the `fedlab node start` process that serves it."""

    def __init__(self, directory: Path, address: str, heartbeat: float = HEARTBEAT) -> None:
        self.directory = directory
        self.address = address
        self.heartbeat = heartbeat
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = directory / "stderr.txt"

    @classmethod
    def create(cls, root: Path, name: str, address: str, *, frame: pd.DataFrame | None = None,
               tags: tuple[str, ...] = ("breast-cancer", "csv"), heartbeat: float = HEARTBEAT,
               researcher_key: str | None = None) -> NodeProcess:
        directory = root / name
        config = init_node_dir(directory, name, address, researcher_key=researcher_key)
        if frame is not None:
            csv = root / f"{name}.csv"
            frame.to_csv(csv, index=False)
            DatasetRegistry(config.db_path).add("bc", list(tags), "csv", str(csv), description="breast cancer")
        node = cls(directory, address, heartbeat)
        node.node_id = config.node_id
        return node

    node_id: str = ""
    launcher: tuple[str, ...] = ()  # runs the node through this command, e.g. ("ip", "netns", "exec", NS)

    def start(self) -> NodeProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [*self.launcher, sys.executable, "-m", "fedlab", "node", "start", str(self.directory),
                 "--researcher", self.address, "--heartbeat", str(self.heartbeat)],
                stdout=subprocess.DEVNULL, stderr=err, env=env,
            )
        return self

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
            return None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of the live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().split(") ")[1][0]
            except OSError:
                continue
            if text in cmdline and state != "Z" and entry.name != str(os.getpid()):
                found.append(f"{entry.name}: {cmdline}")
    return found
