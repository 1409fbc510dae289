"""The README's Python code runs as printed, in order, against the demo's three sites.

A reader copies these blocks into Python or a notebook; a block that fails there is a broken
promise. So every ```python block of README.md is executed, in the README's order, in a real
kernel against three real `fedlab node` processes holding the demo's data
(``fedlab.demo.prepare_federation``). Two substitutions only: the README's researcher address
(port 5555) becomes the test federation's free port, and the node operators' approval (the
README's `fedlab node plan approve` block) is done by an operator thread running that command.

Blocks whose first line is a ``%`` magic run in a second kernel, as they would in a notebook of
their own: one kernel binds the researcher's address once. A block the README marks with an
``<!-- README test: not run (why) -->`` line just above it is not run; the test checks that every
such mark gives a reason and that they stay few.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipywidgets")
pytest.importorskip("torch")

from notebook_federation import NotebookFederation, kernel_env  # noqa: E402

pytestmark = pytest.mark.integration

README = Path(__file__).parents[2] / "README.md"
NOT_RUN = re.compile(r"<!-- README test: not run \((?P<why>[^)]+)\) -->")
README_ADDRESS = re.compile(r"tcp://(?:127\.0\.0\.1|0\.0\.0\.0):5555")
CELL_TIMEOUT = 240  # the training block runs 20 rounds on a loaded 2-core machine


def python_blocks(text: str) -> tuple[list[tuple[int, str]], list[str]]:
    """The README's ```python blocks as (line number, source), and the reasons of those not run."""
    lines = text.splitlines()
    blocks: list[tuple[int, str]] = []
    skipped: list[str] = []
    index = 0
    while index < len(lines):
        if lines[index].strip() == "```python":
            start = index
            index += 1
            body: list[str] = []
            while lines[index].strip() != "```":
                body.append(lines[index])
                index += 1
            mark = NOT_RUN.search(lines[start - 1]) if start else None
            if mark:
                skipped.append(mark["why"])
            else:
                blocks.append((start + 1, "\n".join(body)))
        index += 1
    return blocks, skipped


def test_the_readme_marks_few_blocks_not_run_and_says_why():
    blocks, skipped = python_blocks(README.read_text())
    assert len(blocks) >= 8, blocks
    assert len(skipped) <= 2 and all(why.strip() for why in skipped), skipped


def _run_cells(sources: list[tuple[int, str]], env: dict[str, str], tmp_path: Path,
               after: dict[int, object]) -> list[str]:
    """Execute ``sources`` one cell at a time in one fresh kernel; return the errors, by README line."""
    book = nbformat.v4.new_notebook()
    book.cells = [nbformat.v4.new_code_cell(source) for _, source in sources]
    client = nbclient.NotebookClient(book, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    tmp_path.mkdir(parents=True, exist_ok=True)
    saved = dict(os.environ)
    os.environ.update(env)  # the kernel inherits our environment when it starts
    failures: list[str] = []
    try:
        with client.setup_kernel():
            for index, cell in enumerate(book.cells):
                line = sources[index][0]
                try:
                    client.execute_cell(cell, index)
                except nbclient.exceptions.CellExecutionError as exc:
                    failures.append(f"README line {line}: {str(exc)[-1500:]}")
                    break
                for output in cell.get("outputs", []):
                    if output.get("output_type") == "stream" and output.get("name") == "stderr" \
                            and ("Traceback" in output.get("text", "") or "UsageError" in output.get("text", "")):
                        failures.append(f"README line {line}: on stderr: {output['text'][-1500:]}")
                step = after.get(index)
                if step is not None:
                    step()  # type: ignore[operator]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    nbformat.write(book, tmp_path / "readme.ipynb")  # the executed blocks, to look at when this fails
    return failures


@pytest.mark.timeout(900)
def test_every_readme_python_block_runs_against_the_demo(tmp_path):
    blocks, _ = python_blocks(README.read_text())
    federation = NotebookFederation(tmp_path / "nodes", 3).start()
    federation.start_operator(plans=2)  # the plan of the Python API and the one of the magics
    try:
        env = kernel_env(federation.env(), tmp_path / "jupyter")
        local = [(line, README_ADDRESS.sub(federation.address, source)) for line, source in blocks]
        api = [(line, source) for line, source in local if not source.lstrip().startswith("%")]
        magics = [(line, source) for line, source in local if source.lstrip().startswith("%")]
        assert api and magics

        def approved_by_every_site(count: int) -> None:
            deadline = time.monotonic() + 120
            while len(federation.approved) < count * len(federation.nodes):
                assert time.monotonic() < deadline, f"the operators did not approve: {federation.logs()}"
                time.sleep(0.2)

        approve_cell = next(i for i, (_, source) in enumerate(api) if ".approve(" in source)
        failures = _run_cells(api, env, tmp_path / "api",
                              {approve_cell: lambda: approved_by_every_site(1)})
        assert failures == [], "\n".join(failures) + federation.logs()
        failures = _run_cells(magics, env, tmp_path / "magics", {})
        assert failures == [], "\n".join(failures) + federation.logs()
    finally:
        federation.stop()
