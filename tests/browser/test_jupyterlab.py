"""The notebooks in a real JupyterLab and Chromium, against three real nodes with the demo's data.

What a researcher sees: Run All on 04; the approval panel shows every node Pending with the
command its operator must run; later cells run those commands (the node CLI, one site at a
time, as the demo's operator of all sites) and the panel flips site by site with no cell re-run.
Run All on 03: training starts in the background and the progress bars move while the next cell
is busy (sampled during the run, not only at the end); they end green; FedProx, Scaffold and the
pooled LocalJob follow; the DataFrames and the plots render; no widget is left "Loading".
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
# every width the first three bars take while not yet green, as the page draws it: a MutationObserver
# sees each widget update even when the test's own polling (and its screenshots) is slower than the
# 10 updates a second the progress widget may send, as on a loaded machine or with very fast rounds
WATCH_BARS_JS = """() => {
    window.fedlabBarWidths = [];
    const record = () => Array.from(document.querySelectorAll('.jp-OutputArea .widget-hprogress .progress-bar'))
        .slice(0, 3).forEach(e => { if (!e.classList.contains('progress-bar-success'))
            window.fedlabBarWidths.push(Math.round(parseFloat(e.style.width || '0') * 10) / 10); });
    record();
    window.fedlabBarWatch = new MutationObserver(record);
    window.fedlabBarWatch.observe(document.body,
                                  {subtree: true, attributes: true, attributeFilter: ['style', 'class']});
}"""
WATCHED_WIDTHS_JS = "() => { window.fedlabBarWatch.disconnect(); return window.fedlabBarWidths; }"
# the labels of the first approval panel only (a notebook may show a second one later)
FIRST_PANEL_JS = """() => {
    const label = Array.from(document.querySelectorAll('.jp-OutputArea .widget-label'))
        .find(e => e.textContent.startsWith('plan approval'));
    const area = label && label.closest('.jp-OutputArea-output');
    return area ? Array.from(area.querySelectorAll('.widget-label')).map(e => e.textContent) : [];
}"""
BUSY_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-InputPrompt'))
    .some(e => e.textContent.includes('*'))"""


def count_labels(page, text: str) -> int:
    return sum(1 for label in page.evaluate(LABELS_JS) if label == text)


def wait_labels(page, text: str, n: int, timeout: float = 60.0, *, at_least: bool = False) -> None:
    """Wait until exactly ``n`` widget labels read ``text`` (or at least ``n`` with ``at_least``)."""
    test = ">=" if at_least else "==="
    page.wait_for_function(
        f"() => Array.from(document.querySelectorAll('.jp-OutputArea .widget-label'))"
        f".filter(e => e.textContent === {text!r}).length {test} {n}", timeout=timeout * 1000)


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


def panel_counts(page) -> dict[str, int]:
    """How many nodes the first approval panel shows as Pending, Approved and Rejected."""
    labels = page.evaluate(FIRST_PANEL_JS)
    return {state: labels.count(state) for state in ("Pending", "Approved", "Rejected")}


def finish_and_check_outputs(page, *, images: int, tables: int) -> str:
    """Wait until no cell is busy; check that tables and plots rendered and nothing failed; return the text."""
    page.wait_for_function(f"() => !({BUSY_JS})()", timeout=180_000)
    page.wait_for_function(f"() => document.querySelectorAll('.jp-OutputArea-output img').length >= {images}",
                           timeout=60_000)
    text = "\n".join(page.locator(".jp-Notebook .jp-OutputArea").all_inner_texts())
    for bad in BAD_OUTPUT:
        assert bad not in text, f"{bad!r} in the notebook's outputs"
    assert page.locator(".jp-OutputArea-output table.dataframe").count() >= tables
    return text


@pytest.mark.timeout(360)
def test_approval_notebook_panel_flips_site_by_site_as_operators_decide(page, jupyter_lab, federation, artifacts):
    """04: the panel made by one cell changes while later cells run the operators' commands."""
    open_and_run_all(page, jupyter_lab, "04_approval_workflow.ipynb")
    wait_labels(page, "Pending", 3, timeout=90)
    panel = output_of(page, "plan approval")
    panel.scroll_into_view_if_needed()
    panel.screenshot(path=str(artifacts / "01-approval-pending.png"))
    commands = [label for label in page.evaluate(FIRST_PANEL_JS) if label.startswith("fedlab node plan approve ")]
    directories = {str(node.directory) for node in federation.nodes}
    assert len(commands) == 3 and all(shlex.split(c)[4] in directories for c in commands), commands
    seen: list[dict[str, int]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        counts = panel_counts(page)
        if not seen or counts != seen[-1]:
            seen.append(counts)
            panel.screenshot(path=str(artifacts / f"02-approval-{len(seen)}.png"))
        if counts == {"Pending": 0, "Approved": 2, "Rejected": 1}:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the panel never showed 2 approved and 1 rejected: {seen}")
    # the panel went through each operator's decision in turn, with no cell re-run
    assert {"Pending": 2, "Approved": 1, "Rejected": 0} in seen, seen
    assert {"Pending": 1, "Approved": 2, "Rejected": 0} in seen, seen
    text = finish_and_check_outputs(page, images=1, tables=6)
    assert "Rejected" in text and "not_approved" in text  # the rejecting site is named in the history
    page.screenshot(path=str(artifacts / "03-notebook-end.png"))


@pytest.mark.timeout(420)
def test_training_notebook_bars_move_while_the_next_cell_runs(page, jupyter_lab, federation, artifacts):
    """03: the FedAvg job runs in the background; its bars are sampled while a later cell waits for it."""
    open_and_run_all(page, jupyter_lab, "03_training.ipynb")
    # the request's panel, then the check's panel below it, both end all approved
    wait_labels(page, "plan approval: all 3 nodes may run the plan", 1, timeout=120, at_least=True)
    page.wait_for_function(
        "() => document.querySelectorAll('.jp-OutputArea .widget-hprogress .progress-bar').length >= 3",
        timeout=90_000)
    page.evaluate(WATCH_BARS_JS)
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
    widths_seen = set(page.evaluate(WATCHED_WIDTHS_JS))
    widths_seen |= {round(b["width"], 1) for bars in running for b in bars if not b["success"]}
    assert len(widths_seen) >= 4, f"the bars barely moved while the job ran: {sorted(widths_seen)}"
    assert all(b["width"] == 100 for b in samples[-1][1])

    # FedProx, Scaffold and the pooled LocalJob follow; then tables, plots, nothing loading or failed
    text = finish_and_check_outputs(page, images=4, tables=6)
    assert text.count("training cancer: done, 10/10 rounds") == 3, text
    assert "LocalJob on pooled data" in text
    page.locator(".jp-OutputArea-output img").last.scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "05-notebook-end.png"))


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
