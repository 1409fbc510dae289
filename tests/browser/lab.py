"""A `jupyter lab` server as the browser tests see it, and the JupyterLab settings they use."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

# JupyterLab settings: every cell in the DOM (no virtual scrolling), and no news toast over the outputs.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                         "checkForUpdates": False},
}


def write_lab_settings(home: Path) -> None:
    """Write LAB_SETTINGS into the user settings of the Jupyter config dir ``home/config``."""
    for name, values in LAB_SETTINGS.items():
        path = home / "config" / "lab" / "user-settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


class Lab:
    """A running `jupyter lab` server: its URL, token and root directory."""

    def __init__(self, url: str, token: str, root: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.token, self.root, self.proc, self.log = url, token, root, proc, log

    def api(self, path: str, method: str = "GET") -> object:
        req = urllib.request.Request(f"{self.url}{path}", method=method,  # noqa: S310 -- our own loopback server
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as reply:  # noqa: S310
            body = reply.read()
        return json.loads(body) if body else None

    def kernel_connections(self) -> int:
        """Websocket connections to the server's kernels; 0 while a kernel is still starting (the
        server answers /api/kernels with a 500 then: jupyter_server's last_activity race)."""
        try:
            kernels = self.api("/api/kernels")
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:
                exc.close()
                return 0
            raise
        assert isinstance(kernels, list)
        return sum(int(k.get("connections", 0)) for k in kernels)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
