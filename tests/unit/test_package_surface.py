"""The package's public surface and its layering rules (docs/architecture.md), checked mechanically."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fedlab

PACKAGE = Path(fedlab.__file__).parent

# package -> fedlab packages it may import (besides fedlab.errors, which everything may use)
ALLOWED = {
    "protocol": {"protocol"},
    "analytics": {"protocol", "analytics"},
    "preprocessing": {"protocol", "analytics", "preprocessing"},
    "transport": {"protocol", "transport"},
    "training": {"protocol", "training", "privacy"},  # DP training: dp_args, its accounting (privacy.dp_training)
    "privacy": {"protocol", "analytics", "privacy"},
    "secagg": {"protocol", "analytics", "secagg"},
    "node": {"protocol", "transport", "node", "analytics", "preprocessing", "training", "privacy", "secagg"},
    "researcher": {"protocol", "transport", "researcher", "analytics", "preprocessing", "training", "secagg"},
}


def fedlab_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fedlab" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_layers_import_downwards_only():
    problems = []
    for package, allowed in ALLOWED.items():
        for path in (PACKAGE / package).rglob("*.py"):
            bad = fedlab_imports(path) - allowed - {"errors"}
            if bad:
                problems.append(f"{path.relative_to(PACKAGE)} imports {sorted(bad)}")
    assert problems == []


def test_only_transport_touches_zmq():
    users = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
             if {"zmq"} & {n.split(".")[0] for n in _module_names(p)}]
    assert all(u.startswith("transport/") for u in users), users


def _module_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_nothing_unpickles():
    for path in PACKAGE.rglob("*.py"):
        names = {n.split(".")[0] for n in _module_names(path)}
        assert not names & {"pickle", "cloudpickle", "dill", "marshal"}, path


def test_import_fedlab_works_without_ipython_ipywidgets_or_torch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'IPython', 'ipywidgets', 'torch', 'matplotlib'}:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import fedlab\n"
        "from fedlab import Researcher, DiscardOnTimeout, FedlabError, Experiment, LocalJob, FedAvg\n"
        "import fedlab.training, fedlab.training.messages, fedlab.researcher.experiment\n"
        "import fedlab.node.runtime, fedlab.cli, fedlab.demo\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_exported_names():
    assert sorted(fedlab.__all__) == sorted([
        "__version__", "DataQualityWarning", "DiscardOnDisconnect", "DiscardOnTimeout", "FederatedDataset",
        "FederatedRequest",
        "FedlabApprovalError", "FedlabConfigError", "FedlabDataQualityError", "FedlabDatasetError", "FedlabError",
        "FedlabNodeError", "FedlabProtocolError", "FedlabRequestStopped", "FedlabTimeoutError",
        "FedlabTrainingError", "FedlabTransportError", "FedlabVersionError", "MessagesByNode", "Requests",
        "Researcher", "StopOnDisconnect", "StopOnError", "StopOnTimeout",
        "Experiment", "LocalJob", "TorchTrainingPlan", "TrainingJob", "TrainingPlanApproveJob",
        "TrainingPlanCheckJob", "FedAvg", "FedProx", "Scaffold",
    ])
    for name in fedlab.__all__:
        assert getattr(fedlab, name) is not None
    assert (PACKAGE / "py.typed").exists()


def test_every_error_is_a_fedlab_error():
    from fedlab import errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.FedlabError)
