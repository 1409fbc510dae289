"""Three real nodes for the notebooks in notebooks/, and an operator who approves plans by CLI.

The notebooks are what a researcher runs against `fedlab demo`: three sites made by
``fedlab.demo.prepare_federation`` (breast cancer, diabetes and digit images, split unevenly),
a researcher that binds the address in ``FEDLAB_ADDRESS`` and nodes that dial in. The executed-notebook test and the
browser test both start that federation here, with real `fedlab node start` processes, and
approve training plans the way a node's operator does: `python -m fedlab node plan approve`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from federation import NodeProcess, free_port

from fedlab.training.messages import PENDING

# A node's first training round imports torch, which can starve its heartbeats on a busy 2-core
# machine; 0.5 s heartbeats keep the node from flapping offline (as in test_training.py).
NODE_HEARTBEAT = 0.5


def fedlab_cli(*args: str, timeout: float = 60) -> str:
    """Run `python -m fedlab ARGS` as a node operator would; return its stdout, raise on failure."""
    done = subprocess.run([sys.executable, "-m", "fedlab", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"fedlab {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done.stdout


class NotebookFederation:
    """``n`` node processes dialling ``address``, like the sites `fedlab demo` makes."""

    def __init__(self, root: Path, n: int = 3, *, require_approval: bool = True) -> None:
        from fedlab.demo import prepare_federation
        from fedlab.node.config import load_config

        self.root = root
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.nodes: list[NodeProcess] = []
        for directory in prepare_federation(root, n, self.address):  # exactly the data `fedlab demo` serves
            if not require_approval:
                config = directory / "config.toml"
                config.write_text(config.read_text().replace("require_approval = true", "require_approval = false"))
            node = NodeProcess(directory, self.address, NODE_HEARTBEAT)
            node.node_id = load_config(directory).node_id
            self.nodes.append(node)
        self._operator: threading.Thread | None = None
        self._stop = threading.Event()
        self.approved: list[tuple[str, str]] = []  # (node directory, plan id prefix) in the order approved

    def start(self) -> NotebookFederation:
        """Start the node processes (the demo's configs give each one torch thread: three nodes that
        each spin up a thread per core on a 2-core machine train 40 times slower)."""
        for node in self.nodes:
            node.start()
        return self

    def env(self) -> dict[str, str]:
        """What the notebook's kernel needs: the researcher address, the demo directory (for the
        operator's commands), and one torch thread per process."""
        return {"FEDLAB_ADDRESS": self.address, "FEDLAB_DEMO_DIR": str(self.root), "OMP_NUM_THREADS": "1"}

    def pending(self, node: NodeProcess) -> list[str]:
        """The plan ids (12-character prefixes) waiting for this node operator's decision.

        Read from the node's database rather than `fedlab node plan list`: the operator thread looks
        twice a second, and a CLI process per look and node is not free on a 2-core machine."""
        from fedlab.node.approvals import ApprovalRegistry
        from fedlab.node.config import load_config

        records = ApprovalRegistry(load_config(node.directory).db_path).list()
        return [r.short_id for r in records if r.status == PENDING]

    def approve(self, directory: str, plan_id: str) -> str:
        out = fedlab_cli("node", "plan", "approve", directory, plan_id)
        self.approved.append((directory, plan_id))
        return out

    def approve_pending(self) -> int:
        """Approve every pending plan on every node; return how many."""
        count = 0
        for node in self.nodes:
            for plan_id in self.pending(node):
                self.approve(str(node.directory), plan_id)
                count += 1
        return count

    def start_operator(self, interval: float = 0.5, plans: int = 1) -> None:
        """A thread that approves each plan once it is pending, as an attentive operator would,
        until every node has approved ``plans`` plans (each look is a CLI run: not free on 2 cores)."""
        def loop() -> None:
            while not self._stop.wait(interval):
                self.approve_pending()
                if len(self.approved) >= plans * len(self.nodes):
                    return

        self._operator = threading.Thread(target=loop, name="node-operator", daemon=True)
        self._operator.start()

    def stop(self) -> None:
        self._stop.set()
        if self._operator is not None:
            self._operator.join(timeout=30)
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()  # all at once: each takes a moment to shut down
        for node in self.nodes:
            node.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {node.directory.name} ---\n{node.log()[-3000:]}" for node in self.nodes)


def kernel_env(extra: dict[str, str], home: Path) -> dict[str, str]:
    """The environment of a kernel or Jupyter server: ours, with private Jupyter/IPython dirs."""
    env = dict(os.environ)
    env.update(extra)
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython")):
        (home / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(home / sub)
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env
