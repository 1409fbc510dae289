"""notebooks/03_training.ipynb in a real JupyterLab and Chromium, against three real nodes.

What a researcher sees: Run All; the approval panel shows every node Pending with the command its
operator must run; we run those commands (the node CLI, as an operator does) while the notebook
waits, and the panel flips node by node with no cell re-run; training starts in the background
and the progress bars move while the next cell is busy (sampled during the run, not only at the
end); they end green; the DataFrames and the plots render; no widget is left "Loading".
"""

from __future__ import annotations

import shlex
import time

import pytest

pytest.importorskip("playwright.sync_api")
pytest.importorskip("torch")

pytestmark = pytest.mark.integration

NOTEBOOK = "03_training.ipynb"
BAD_OUTPUT = ("Loading widget", "Error displaying widget", "Traceback", "UsageError")

LABELS_JS = "() => Array.from(document.querySelectorAll('.jp-OutputArea .widget-label')).map(e => e.textContent)"
BARS_JS = """() => Array.from(document.querySelectorAll('.jp-OutputArea .widget-hprogress .progress-bar'))
    .map(e => ({width: parseFloat(e.style.width || '0'), success: e.classList.contains('progress-bar-success'),
                danger: e.classList.contains('progress-bar-danger')}))"""
BUSY_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-InputPrompt'))
    .some(e => e.textContent.includes('*'))"""


def count_labels(page, text: str) -> int:
    return sum(1 for label in page.evaluate(LABELS_JS) if label == text)


def wait_labels(page, text: str, n: int, timeout: float = 60.0) -> None:
    page.wait_for_function(
        f"() => Array.from(document.querySelectorAll('.jp-OutputArea .widget-label'))"
        f".filter(e => e.textContent === {text!r}).length === {n}", timeout=timeout * 1000)


def output_of(page, text: str):
    """The output area that holds a widget whose label starts with ``text``."""
    return page.locator(".jp-OutputArea-output", has=page.locator(".widget-label", has_text=text)).first


def open_and_run_all(page, lab, notebook: str = NOTEBOOK) -> None:
    page.goto(f"{lab.url}/lab/tree/{notebook}?token={lab.token}&reset")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    deadline = time.monotonic() + 60
    while lab.kernel_connections() < 1:  # "idle" shows before the websocket is up; Run All then is lost
        assert time.monotonic() < deadline, f"the kernel never connected:\n{lab.log_tail()}"
        time.sleep(0.2)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle'], .jp-KernelStatus",
                           timeout=60_000, state="attached")
    page.locator("li.lm-MenuBar-item", has_text="Run").first.click()
    page.locator("li.lm-Menu-item[data-command='runmenu:run-all']").click()


@pytest.mark.timeout(360)
def test_training_notebook_in_jupyterlab_approval_flips_and_bars_move(page, jupyter_lab, federation, artifacts):
    open_and_run_all(page, jupyter_lab)

    # -- approval: every node Pending, with the exact command its operator runs ---------------------
    wait_labels(page, "Pending", 3, timeout=90)
    panel = output_of(page, "plan approval")
    panel.scroll_into_view_if_needed()
    panel.screenshot(path=str(artifacts / "01-approval-pending.png"))
    commands = [label for label in page.evaluate(LABELS_JS) if label.startswith("fedlab node plan approve ")]
    assert len(commands) == 3, commands
    directories = {str(node.directory) for node in federation.nodes}
    for step, command in enumerate(commands, start=1):
        program, *args = shlex.split(command)
        assert program == "fedlab" and args[:3] == ["node", "plan", "approve"] and args[3] in directories, command
        federation.approve(args[3], args[4])  # `python -m fedlab node plan approve DIR PLAN_ID`
        wait_labels(page, "Approved", step, timeout=30)  # the panel flips by itself, no cell re-run
        assert count_labels(page, "Pending") == 3 - step
        panel.screenshot(path=str(artifacts / f"02-approval-{step}-approved.png"))
    wait_labels(page, "plan approval: all 3 nodes may run the plan", 1, timeout=30)

    # -- training: sample the bars while the job runs and the next cell waits for it ------------------
    page.wait_for_function(
        "() => document.querySelectorAll('.jp-OutputArea .widget-hprogress .progress-bar').length >= 3",
        timeout=60_000)
    progress = output_of(page, "training cancer")
    progress.scroll_into_view_if_needed()
    samples: list[tuple[float, list[dict]]] = []
    shots = {"03-progress-started.png": 0.0, "03-progress-halfway.png": 50.0}
    t0 = time.monotonic()
    while time.monotonic() - t0 < 240:
        bars = page.evaluate(BARS_JS)[:3]
        samples.append((time.monotonic() - t0, bars))
        if any(b["danger"] for b in bars):
            progress.screenshot(path=str(artifacts / "03-progress-failed.png"))
            raise AssertionError(f"a node failed: {page.evaluate(LABELS_JS)}")
        if all(b["success"] for b in bars):
            break
        for name, past in list(shots.items()):
            if any(past < b["width"] < 100 for b in bars):
                progress.screenshot(path=str(artifacts / name))
                del shots[name]
        time.sleep(0.1)
    else:
        raise AssertionError(f"training did not finish in 240 s; last bars {samples[-1]}")
    progress.screenshot(path=str(artifacts / "04-progress-done.png"))
    running = [bars for _, bars in samples if not all(b["success"] for b in bars)]
    partial = [bars for bars in running if any(0 < b["width"] < 100 and not b["success"] for b in bars)]
    assert partial, f"no bar was ever seen part-way: {samples}"
    widths_seen = {round(b["width"], 1) for bars in running for b in bars if not b["success"]}
    assert len(widths_seen) >= 4, f"the bars barely moved while the job ran: {sorted(widths_seen)}"
    assert all(b["width"] == 100 for b in samples[-1][1])

    # -- the rest of the notebook: tables, plots, nothing left loading or failed -----------------------
    page.wait_for_function(f"() => !({BUSY_JS})()", timeout=120_000)
    page.wait_for_function("() => document.querySelectorAll('.jp-OutputArea-output img').length >= 3",
                           timeout=60_000)
    areas = page.locator(".jp-Notebook .jp-OutputArea")
    text = "\n".join(areas.all_inner_texts())
    for bad in BAD_OUTPUT:
        assert bad not in text, f"{bad!r} in the notebook's outputs"
    assert page.locator(".jp-OutputArea-output table.dataframe").count() >= 4  # stats, hist, jobs, history, ...
    assert page.locator(".jp-OutputArea-output img").count() >= 3  # histogram, final loss PNG, loss plot
    assert "training cancer: done, 12/12 rounds" in text
    page.locator(".jp-OutputArea-output img").last.scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "05-notebook-end.png"))
    assert len(federation.approved) == 3


def test_quickstart_notebook_renders_tables_plot_and_form(page, jupyter_lab, artifacts):
    open_and_run_all(page, jupyter_lab, "01_quickstart.ipynb")
    page.wait_for_function("() => document.querySelectorAll('.jp-Notebook .jp-InputPrompt').length > 0 && "
                           "Array.from(document.querySelectorAll('.jp-Notebook .jp-InputPrompt'))"
                           ".every(e => /\\[\\d+\\]/.test(e.textContent) || e.closest('.jp-MarkdownCell'))",
                           timeout=120_000)
    page.wait_for_function("() => document.querySelectorAll('.jp-OutputArea-output img').length >= 1", timeout=30_000)
    page.wait_for_function("() => document.querySelectorAll('.jp-OutputArea .widget-button').length >= 1",
                           timeout=30_000)  # the stats form rendered as widgets, not as text
    text = "\n".join(page.locator(".jp-Notebook .jp-OutputArea").all_inner_texts())
    for bad in BAD_OUTPUT:
        assert bad not in text, f"{bad!r} in the notebook's outputs"
    assert page.locator(".jp-OutputArea-output table.dataframe").count() >= 5  # connect, nodes, datasets, stats...
    page.locator(".jp-OutputArea-output img").first.scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "01-histogram.png"))
    page.locator(".jp-OutputArea .widget-button").last.scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "02-form.png"))
