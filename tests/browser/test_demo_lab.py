"""`fedlab demo` as the README's first command runs it: nodes, then JupyterLab on the quickstart.

The demo is started as a user would (with ``--no-browser``, so it prints the URL instead of
opening a browser, and with a copy of notebooks/ so that Run All does not write outputs into the
repository). Chromium opens the printed URL, which lands on 01_quickstart.ipynb; Run All
connects to the demo's nodes and renders their tables. Then Ctrl-C (SIGINT) to the demo stops
JupyterLab, the notebook's kernel and the nodes: no process is left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from federation import free_port, processes_mentioning
from lab import Lab, write_lab_settings
from notebook_federation import kernel_env
from test_jupyterlab import BAD_OUTPUT, open_and_run_all

pytest.importorskip("playwright.sync_api")
pytest.importorskip("torch")

pytestmark = pytest.mark.integration

NOTEBOOKS = Path(__file__).parents[2] / "notebooks"


@pytest.mark.timeout(300)
def test_demo_opens_jupyterlab_on_the_quickstart_and_ctrl_c_stops_everything(browser_page, tmp_path, artifacts):
    notebooks = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS, notebooks)
    home = tmp_path / "jupyter"
    env = kernel_env({}, home)
    write_lab_settings(home)
    demo_dir = tmp_path / "demo-federation"
    output = tmp_path / "demo.out"
    port, lab_port = free_port(), free_port()
    with open(output, "wb") as out:
        demo = subprocess.Popen([sys.executable, "-m", "fedlab", "demo", "--dir", str(demo_dir), "--port", str(port),
                                 "--lab-port", str(lab_port), "--no-browser", "--notebooks", str(notebooks)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"open (http://\S+)", output.read_text(errors="replace"))):
            assert demo.poll() is None and time.monotonic() < deadline, output.read_text(errors="replace")
            time.sleep(0.2)
        url = found.group(1)
        assert "/lab/tree/01_quickstart.ipynb?token=" in url, url
        token = url.split("token=")[1]
        lab = Lab(f"http://localhost:{lab_port}", token, notebooks, demo, demo_dir / "jupyterlab.log")
        open_and_run_all(browser_page, lab, "01_quickstart.ipynb")
        browser_page.wait_for_function(
            "() => Array.from(document.querySelectorAll('.jp-OutputArea-output table.dataframe'))"
            ".some(t => t.textContent.includes('hospital-c') && t.textContent.includes('online'))", timeout=120_000)
        browser_page.wait_for_function("() => document.querySelectorAll('.jp-OutputArea-output img').length >= 1",
                                       timeout=120_000)
        # the whole notebook has run (every prompt numbered, none busy): that is the README's screenshot
        browser_page.wait_for_function(
            "() => Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt'))"
            ".every(p => /\\[\\d+\\]/.test(p.textContent))", timeout=240_000)
        # the demo's JupyterLab settings (binder/jupyter-config): no autosave into the checkout, no news
        docmanager = lab.api("/lab/api/settings/@jupyterlab/docmanager-extension:plugin")
        # overrides become the schema's defaults (the user's own settings still win)
        assert docmanager["schema"]["properties"]["autosave"]["default"] is False  # type: ignore[index]
        text = "\n".join(browser_page.locator(".jp-Notebook .jp-OutputArea").all_inner_texts())
        for bad in BAD_OUTPUT:
            assert bad not in text, f"{bad!r} in the quickstart's outputs"
        browser_page.screenshot(path=str(artifacts / "01-demo-quickstart.png"))
        kernels = processes_mentioning("ipykernel")
        assert any(str(home) in Path(f"/proc/{k.split(':')[0]}/environ").read_bytes().decode(errors="replace")
                   for k in kernels), "the notebook's kernel is not running under the demo's JupyterLab"
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0, output.read_text(errors="replace")
        assert "stopped" in output.read_text()
        left = processes_mentioning(str(demo_dir)) + processes_mentioning(str(notebooks)) + [
            k for k in processes_mentioning("ipykernel")
            if str(home) in Path(f"/proc/{k.split(':')[0]}/environ").read_bytes().decode(errors="replace")]
        assert left == [], left
    finally:
        if demo.poll() is None:
            demo.kill()
        for line in processes_mentioning(str(demo_dir)) + processes_mentioning(str(notebooks)):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
