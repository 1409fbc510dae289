"""fedlab: federated analytics and training from a notebook, over data that stays on its nodes.

The public names below are imported lazily, so ``import fedlab`` stays cheap and works
without IPython, ipywidgets or torch; each feature imports what it needs when used
(``fedlab.TorchTrainingPlan`` imports torch, the rest of training only when it runs).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Researcher": "fedlab.researcher",
    "FederatedDataset": "fedlab.researcher",
    "FederatedRequest": "fedlab.researcher",
    "MessagesByNode": "fedlab.researcher",
    "Requests": "fedlab.researcher",
    "DiscardOnDisconnect": "fedlab.researcher",
    "DiscardOnTimeout": "fedlab.researcher",
    "StopOnTimeout": "fedlab.researcher",
    "StopOnDisconnect": "fedlab.researcher",
    "StopOnError": "fedlab.researcher",
    "DataQualityWarning": "fedlab.researcher",
    "Experiment": "fedlab.researcher",
    "LocalJob": "fedlab.researcher",
    "TrainingJob": "fedlab.researcher",
    "TrainingPlanApproveJob": "fedlab.researcher",
    "TrainingPlanCheckJob": "fedlab.researcher",
    "FedAvg": "fedlab.researcher",
    "FedProx": "fedlab.researcher",
    "Scaffold": "fedlab.researcher",
    "TorchTrainingPlan": "fedlab.training",
    "FedlabError": "fedlab.errors",
    "FedlabConfigError": "fedlab.errors",
    "FedlabDatasetError": "fedlab.errors",
    "FedlabDataQualityError": "fedlab.errors",
    "FedlabNodeError": "fedlab.errors",
    "FedlabProtocolError": "fedlab.errors",
    "FedlabRequestStopped": "fedlab.errors",
    "FedlabTimeoutError": "fedlab.errors",
    "FedlabTransportError": "fedlab.errors",
    "FedlabVersionError": "fedlab.errors",
    "FedlabApprovalError": "fedlab.errors",
    "FedlabTrainingError": "fedlab.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:  # pragma: no cover
    from fedlab.errors import *  # noqa: F403
    from fedlab.researcher import *  # noqa: F403
    from fedlab.training import TorchTrainingPlan as TorchTrainingPlan


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext fedlab``: registers ``%fed`` and ``%%fed``. IPython is imported only now."""
    from fedlab.notebook.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext fedlab``: cancels background jobs and unbinds the researcher's socket."""
    from fedlab.notebook.magics import unload_ipython_extension as unload

    unload(ipython)
