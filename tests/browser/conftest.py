"""A real JupyterLab, driven by Playwright through Debian's Chromium, against three real nodes.

What it takes (docs/testing.md says more): the system Chromium at /usr/bin/chromium, from
Debian's packages (never `playwright install`, which downloads a browser of its own), a
`jupyter lab` subprocess with its own config/data/runtime dirs and a token, and waiting for the
kernel's websocket before Run All.
Screenshots go to tests/browser/artifacts/ (gitignored) so a failure can be looked at.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))

from federation import free_port  # noqa: E402
from lab import Lab, write_lab_settings  # noqa: E402
from notebook_federation import NotebookFederation, kernel_env  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
NOTEBOOKS = Path(__file__).parents[2] / "notebooks"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if CHROMIUM.exists():
        return
    skip = pytest.mark.skip(reason=f"no Chromium at {CHROMIUM}: install it with `apt-get install -y chromium "
                                   "chromium-driver fonts-dejavu-core` (scripts/test does this when run as root)")
    for item in items:
        if "tests/browser/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


@pytest.fixture
def artifacts(request) -> Path:
    """Where this test's screenshots go: tests/browser/artifacts/TEST_NAME/."""
    path = ARTIFACTS / request.node.name.replace("/", "_")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


@pytest.fixture
def federation(tmp_path) -> Iterator[NotebookFederation]:
    """Three nodes that require approval; the test approves plans itself, with the node CLI."""
    fed = NotebookFederation(tmp_path / "nodes", 3).start()
    yield fed
    fed.stop()


@pytest.fixture
def jupyter_lab(tmp_path, federation) -> Iterator[Lab]:
    """`jupyter lab` serving a copy of notebooks/ (autosave must not touch the repository), its
    kernels started with ``FEDLAB_ADDRESS`` pointing at the nodes' researcher address."""
    root = tmp_path / "lab"
    shutil.copytree(NOTEBOOKS, root)
    home = tmp_path / "jupyter"
    env = kernel_env(federation.env(), home)
    write_lab_settings(home)
    token, port = secrets.token_hex(16), free_port()
    log = tmp_path / "jupyter-lab.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1", "--allow-root",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    lab = Lab(f"http://127.0.0.1:{port}", token, root, proc, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                lab.api("/api/status")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"jupyter lab did not start:\n{lab.log_tail()}") from None
                time.sleep(0.2)
        yield lab
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _chromium_page(artifacts: Path) -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1000})
            page = context.new_page()
            page.set_default_timeout(30_000)
            yield page
            page.screenshot(path=str(artifacts / "zz-final.png"))
        finally:
            browser.close()


@pytest.fixture
def page(artifacts, jupyter_lab):
    """A Chromium page (1600x1000) from the system browser; a final screenshot whatever happens
    (taken before the server stops: this fixture depends on it so that it is torn down first)."""
    yield from _chromium_page(artifacts)


@pytest.fixture
def browser_page(artifacts):
    """The same page for a test that starts its own server (`fedlab demo`)."""
    yield from _chromium_page(artifacts)
