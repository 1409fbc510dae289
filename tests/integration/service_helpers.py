"""A real `fedlab researcher start` process and the kernels that attach to it, for the service tests.

Each test gets its own run directory (``FEDLAB_RUN_DIR``, short enough for a socket path, under
a parent that others may traverse, so that the run directory's own mode is what keeps them out),
set in the environment so that every process the test starts (service, clients) finds it.
Clients are separate Python processes, as notebook kernels are.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from federation import wait_until

from fedlab.transport.service_files import RUN_DIR_ENV, ServiceInfo, find_service

HERE = Path(__file__).parent


def private_run_dir() -> Path:
    """A new FEDLAB_RUN_DIR below a 0755 parent in /tmp (the service makes the run directory itself, 0700)."""
    parent = Path(tempfile.mkdtemp(prefix="flsvc", dir="/tmp"))
    parent.chmod(0o755)  # noqa: S103 -- on purpose: the run directory inside must be what keeps others out
    atexit.register(shutil.rmtree, parent, True)  # after the tests' services and clients are gone
    return parent / "run"


class ServiceProcess:
    """`fedlab researcher start --address ADDRESS` as a subprocess, its log beside the run directory."""

    def __init__(self, address: str, *args: str) -> None:
        self.address = address
        self.run_dir = Path(os.environ[RUN_DIR_ENV])
        self.out = self.run_dir.parent / f"service-{address.rsplit(':', 1)[1]}.out"
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "fedlab", "researcher", "start", "--address", address,
                                          "--heartbeat", "0.2", *args], stdout=out, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def wait_listening(self, timeout: float = 60) -> ServiceInfo:
        def ready() -> ServiceInfo | None:
            assert self.proc.poll() is None, self.log()
            info = find_service(self.address, settle=0.0)
            return info if info is not None and info.pid == self.proc.pid else None

        return wait_until(ready, timeout, "the researcher service to listen")

    def log(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def client(script: str, *args: str, out: Path) -> subprocess.Popen[bytes]:
    """A kernel-like Python process running ``script`` (with sys.argv[1:] = args); its output in ``out``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get(
        "PYTHONPATH", "")]))
    with open(out, "ab") as sink:
        return subprocess.Popen([sys.executable, "-c", script, *args], stdout=sink, stderr=subprocess.STDOUT,
                                env=env)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedlab", *args], capture_output=True, text=True, timeout=timeout,
                          check=False)
