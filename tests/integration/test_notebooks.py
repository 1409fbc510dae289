"""Every notebook in notebooks/ runs top to bottom against three real nodes, without an error.

The notebooks are documentation people run, so they are executed as they are shipped: a kernel
per notebook (nbclient), the researcher address passed in ``FEDLAB_ADDRESS``, real `fedlab node
start` processes holding the demo's data (`fedlab.demo.prepare_federation`). The notebooks that
train approve their plan themselves, running the node operator's CLI command for each demo site
(``FEDLAB_DEMO_DIR``), as a demo user who operates all three sites would. The widgets' final
state is stored in the notebook (``store_widget_state``),
so the test also checks what a reader of the saved notebook would see.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipywidgets")
pytest.importorskip("torch")

from notebook_federation import NotebookFederation, kernel_env  # noqa: E402

pytestmark = pytest.mark.integration

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 100  # one cell; the first training round waits for every node to import torch


def run_notebook(path: Path, tmp_path: Path, env: dict[str, str]) -> object:
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(book, timeout=CELL_TIMEOUT, kernel_name="python3", store_widget_state=True,
                                     resources={"metadata": {"path": str(tmp_path)}})
    saved = dict(os.environ)
    os.environ.update(env)  # the kernel inherits our environment when it starts
    try:
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return book


def errors(book) -> list[str]:
    found = []
    for index, cell in enumerate(book.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                found.append(f"cell {index}: {output['ename']}: {output['evalue']}")
            elif output.get("output_type") == "stream" and output.get("name") == "stderr" \
                    and "Traceback" in output.get("text", ""):
                found.append(f"cell {index}: traceback on stderr: {output['text'][-2000:]}")
    return found


def widget_states(book) -> dict[str, dict]:
    state = book.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    return {model_id: model["state"] for model_id, model in state.get("state", {}).items()}


@pytest.fixture
def federation(tmp_path):
    fed = NotebookFederation(tmp_path / "nodes", 3).start()
    yield fed
    fed.stop()


def test_the_notebooks_directory_has_the_documented_notebooks():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_quickstart.ipynb", "02_analytics.ipynb", "03_training.ipynb", "04_approval_workflow.ipynb",
                     "05_preprocessing.ipynb"], names
    for path in NOTEBOOKS:  # shipped clean: no outputs, no stale widget state
        book = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") and c.get("execution_count") is None
                   for c in book.cells if c.cell_type == "code"), f"{path.name} is saved with outputs"
        assert "widgets" not in book.metadata, f"{path.name} is saved with widget state"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_against_three_real_nodes(path, tmp_path, federation):
    book = run_notebook(path, tmp_path, kernel_env(federation.env(), tmp_path / "jupyter"))
    nbformat.write(book, tmp_path / path.name)  # the executed notebook, to look at when this fails
    assert errors(book) == [], federation.logs()
    html = "".join(str(o.get("data", {}).get("text/html", "")) for c in book.cells for o in c.get("outputs", []))
    assert "dataframe" in html  # results are shown as DataFrames
    images = [o for c in book.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "no plot was rendered"
    states = widget_states(book)
    if path.stem == "03_training":
        bars = [s for s in states.values() if s.get("_model_name") == "IntProgressModel"]
        # FedAvg, FedProx and Scaffold: a panel each, a bar per node, all green and full
        assert len(bars) == 9 and all(b["bar_style"] == "success" and b["value"] == b["max"] for b in bars), bars
        labels = [s.get("value") for s in states.values() if s.get("_model_name") == "LabelModel"]
        # two panels (the request, then the check after the operators' commands), 3 sites approved in each
        assert labels.count("Approved") == 6 and "plan approval: all 3 nodes may run the plan" in labels, labels
        comparison = next(o["data"]["text/plain"] for c in book.cells for o in c.get("outputs", [])
                          if "LocalJob on pooled data" in str(o.get("data", {}).get("text/plain", "")))
        assert "FedProx" in comparison and "Scaffold" in comparison, comparison
    if path.stem == "02_analytics":
        text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                       for c in book.cells for o in c.get("outputs", []))
        # refusals as the user sees them: the node, the rule and its setting, beside what the others sent
        assert 'withheld age.min/max: min_max: this node does not release minimum and maximum' in text, text[-3000:]
        assert "hospital-c withheld age.histogram: max_bins_fraction: 15 bins for 112 values" in text, text[-3000:]
        assert "bins built from 2 nodes; withheld by ['hospital-c']" in text, text[-3000:]
        assert "breast cancer: federated = pooled" in text and "diabetes: federated = pooled" in text, text[-3000:]
    if path.stem == "05_preprocessing":
        text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                       for c in book.cells for o in c.get("outputs", []))
        assert "federated = pooled ComBat" in text, text[-3000:]
        assert "refused: min-max scaling of 'bmi' needs exact min and max" in text, text[-3000:]
        # the derived dataset's lineage, on every node
        assert html.count("impute(bmi=") == 3 and html.count(
            "combat(bmi, bp, s1, s3, s5) → standardize(age, bmi, bp, s1, s3, s5) → onehot(sex)") == 3, html[-3000:]
