"""Federated training: the plan a researcher writes, and the round of local work a node runs.

Torch is imported only by the modules that need it, and the names below are exported
lazily, so ``import fedlab.training`` (and its wire types in ``fedlab.training.messages``)
works where torch is not installed: a researcher's notebook can build, hash and send a
plan as text, and decode replies, before anything imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "TorchTrainingPlan": "fedlab.training.plan",
    "plan_source": "fedlab.training.source",
    "plan_id": "fedlab.training.source",
    "load_plan_class": "fedlab.training.source",
    "pack_named": "fedlab.training.tensors",
    "unpack_named": "fedlab.training.tensors",
    "ImageFolderData": "fedlab.training.data",
    "load_dataset": "fedlab.training.data",
    "encode_state": "fedlab.training.state",
    "decode_state": "fedlab.training.state",
    "optimizer_state": "fedlab.training.state",
    "load_optimizer_state": "fedlab.training.state",
    "TrainingArgs": "fedlab.training.args",
    "Progress": "fedlab.training.args",
    "RoundResult": "fedlab.training.args",
    "initial_params": "fedlab.training.loop",
    "run_round": "fedlab.training.loop",
    "shared_param_names": "fedlab.training.loop",
    "split_indices": "fedlab.training.loop",
}

__all__ = [
    "ImageFolderData",
    "Progress",
    "RoundResult",
    "TorchTrainingPlan",
    "TrainingArgs",
    "decode_state",
    "encode_state",
    "initial_params",
    "load_dataset",
    "load_optimizer_state",
    "load_plan_class",
    "optimizer_state",
    "pack_named",
    "plan_id",
    "plan_source",
    "run_round",
    "shared_param_names",
    "split_indices",
    "unpack_named",
]

if TYPE_CHECKING:  # pragma: no cover
    from fedlab.training.args import Progress, RoundResult, TrainingArgs
    from fedlab.training.data import ImageFolderData, load_dataset
    from fedlab.training.loop import initial_params, run_round, shared_param_names, split_indices
    from fedlab.training.plan import TorchTrainingPlan
    from fedlab.training.source import load_plan_class, plan_id, plan_source
    from fedlab.training.state import decode_state, encode_state, load_optimizer_state, optimizer_state
    from fedlab.training.tensors import pack_named, unpack_named


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedlab.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
