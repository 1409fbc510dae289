"""Two notebooks of `fedlab demo` open and running at once, and a kernel restart in one of them.

Before the researcher service, the second notebook's `%fed connect` failed (the first kernel held
the port) and a kernel restart dropped every node. Here the demo starts its service; Chromium
opens 03_training (FedAvg in the background, then FedProx, Scaffold) and, while it trains,
01_quickstart in a second tab; both run against the same three nodes. The quickstart's kernel is
then restarted while the training still runs: the training ends green, the restarted kernel
finds the nodes online at once when its notebook runs again, and no node ever reconnected.
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
from test_jupyterlab import BAD_OUTPUT, BARS_JS, BUSY_JS, finish_and_check_outputs

pytest.importorskip("playwright.sync_api")
pytest.importorskip("torch")

pytestmark = pytest.mark.integration

NOTEBOOKS = Path(__file__).parents[2] / "notebooks"
ONLINE_TABLE_JS = ("() => Array.from(document.querySelectorAll('.jp-OutputArea-output table.dataframe'))"
                   ".some(t => t.textContent.includes('hospital-c') && t.textContent.includes('online'))")


def kernel_of(lab: Lab, notebook: str) -> dict:
    """The kernel of the session that has ``notebook`` open (None while there is none)."""
    sessions = lab.api("/api/sessions")
    assert isinstance(sessions, list)
    for session in sessions:
        if session.get("path", "").endswith(notebook):
            return session["kernel"]
    return {}


def run_all(page, lab: Lab, notebook: str, *, reload: bool = True) -> None:
    """Open ``notebook`` (unless it is open) and Run All once its own kernel's websocket is up."""
    if reload:
        page.goto(f"{lab.url}/lab/tree/{notebook}?token={lab.token}")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    deadline = time.monotonic() + 90
    while int(kernel_of(lab, notebook).get("connections", 0)) < 1 or \
            kernel_of(lab, notebook).get("execution_state") != "idle":
        assert time.monotonic() < deadline, f"the kernel of {notebook} never got ready:\n{lab.log_tail()}"
        time.sleep(0.2)
    page.locator("li.lm-MenuBar-item", has_text="Run").first.click()
    page.locator("li.lm-Menu-item[data-command='runmenu:run-all']").click()


def bars(page) -> list[dict]:
    return page.evaluate(BARS_JS)[:3]


@pytest.mark.timeout(720)
def test_two_demo_notebooks_run_at_once_and_a_kernel_restart_keeps_the_nodes(browser_page, tmp_path, artifacts):
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
        token = found.group(1).split("token=")[1]
        lab = Lab(f"http://localhost:{lab_port}", token, notebooks, demo, demo_dir / "jupyterlab.log")
        training, quick = browser_page, browser_page.context.new_page()

        # 03 trains (FedAvg in the background, then FedProx, Scaffold, a LocalJob); 01 runs beside it
        run_all(training, lab, "03_training.ipynb")
        run_all(quick, lab, "01_quickstart.ipynb")
        quick.wait_for_function(ONLINE_TABLE_JS, timeout=120_000)
        training.wait_for_function(
            "() => document.querySelectorAll('.jp-OutputArea .widget-hprogress .progress-bar').length >= 3",
            timeout=180_000)
        quick.wait_for_function("() => document.querySelectorAll('.jp-OutputArea-output img').length >= 1",
                                timeout=120_000)
        text = "\n".join(quick.locator(".jp-Notebook .jp-OutputArea").all_inner_texts())
        for bad in BAD_OUTPUT:
            assert bad not in text, f"{bad!r} in the quickstart's outputs beside the training"
        assert "attached to the researcher service" in text
        quick.screenshot(path=str(artifacts / "01-quickstart-beside-training.png"))

        # restart the quickstart's kernel while the training notebook is still at work
        assert training.evaluate(BUSY_JS), "the training notebook finished before the restart"
        old = kernel_of(lab, "01_quickstart.ipynb")
        lab.api(f"/api/kernels/{old['id']}/restart", method="POST")
        log = demo_dir / "researcher.log"
        deadline = time.monotonic() + 60
        while "its connection closed (the kernel exited" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        busy_after_restart = training.evaluate(BUSY_JS)

        # the training carries on and ends green; the restarted kernel sees the nodes at once
        text = finish_and_check_outputs(training, images=4, tables=6)
        assert text.count("training cancer: done, 10/10 rounds") == 3, text
        assert not any(b["danger"] for b in bars(training))
        training.screenshot(path=str(artifacts / "02-training-done-after-the-restart.png"))
        quick.locator("li.lm-MenuBar-item", has_text="Edit").first.click()  # the old outputs go first
        quick.locator("li.lm-Menu-item", has_text="Clear Outputs of All Cells").first.click()
        quick.wait_for_function("() => document.querySelectorAll('.jp-OutputArea-output table').length === 0",
                                timeout=30_000)
        run_all(quick, lab, "01_quickstart.ipynb", reload=False)
        quick.wait_for_function(ONLINE_TABLE_JS, timeout=120_000)
        assert busy_after_restart, "the training notebook finished before the restart took effect"
        service_log = log.read_text(errors="replace")
        assert "offline until it reconnects" not in service_log  # no node connection ever ended
        for node_dir in sorted(demo_dir.glob("hospital-*")):
            assert (node_dir / "node.log").read_text().count("connected to researcher") == 1, node_dir
        quick.screenshot(path=str(artifacts / "03-quickstart-after-restart.png"))

        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0, output.read_text(errors="replace")
        assert processes_mentioning(str(demo_dir)) + processes_mentioning(str(notebooks)) == []
    finally:
        if demo.poll() is None:
            demo.kill()
        for line in processes_mentioning(str(demo_dir)) + processes_mentioning(str(notebooks)):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
