"""``TorchTrainingPlan``: the class a researcher subclasses to say what one node trains.

A plan only answers small questions (which model, which optimizer, which data, what is
the loss of one batch); the training loop (``fedlab.training.loop``) owns the iteration,
seeding, federated corrections and validation, so a plan cannot forget to be deterministic
and the same plan gives the same result on a node and in a ``LocalJob``.

A plan travels to nodes as source text (``fedlab.training.source``), so everything it uses
must be importable there: the module prelude imports ``numpy as np``, ``torch``, ``nn``,
``F`` and ``TorchTrainingPlan``; add other import lines to ``dependencies``.

The loop moves the model and the batches to the round's device (a node's GPU with
``use_gpu=True``, see docs/gpu.md); a plan never moves anything itself.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

__all__ = ["TorchTrainingPlan"]


class TorchTrainingPlan:
    """Base class of a training plan; override ``init_model``, ``training_data`` and ``training_step``.

    Example::

        class LogisticRegression(TorchTrainingPlan):
            def init_model(self, model_args):
                return nn.Linear(model_args["n_features"], 1)

            def training_data(self, dataset):
                return dataset.drop(columns="target").to_numpy(), dataset["target"].to_numpy()

            def training_step(self, data, target):
                logits = self.model(data).squeeze(1)
                return F.binary_cross_entropy_with_logits(logits, target.float())
    """

    #: Extra import lines for the plan's module, e.g. ``["import math"]``.
    dependencies: ClassVar[list[str]] = []

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        #: Where the round trains (set by the loop before ``init_model``): the model and the batches are
        #: there. A plan that makes tensors of its own in ``training_step`` makes them here
        #: (``torch.zeros(n, device=self.device)``), so that it runs on a node's GPU as on the CPU.
        self.device: torch.device = torch.device("cpu")

    def init_model(self, model_args: dict[str, Any]) -> torch.nn.Module:
        """Build the model from ``model_args`` (the same on every node). Required."""
        raise NotImplementedError(f"{type(self).__name__} must define init_model(self, model_args)")

    def init_optimizer(self, optimizer_args: dict[str, Any]) -> torch.optim.Optimizer:
        """The optimizer of one round; by default SGD with ``lr=0.01`` unless ``optimizer_args`` say otherwise."""
        if self.model is None:
            raise RuntimeError("init_optimizer was called before init_model")
        return torch.optim.SGD(self.model.parameters(), **{"lr": 0.01, **optimizer_args})

    def training_data(self, dataset: Any) -> Any:
        """``(X, y)`` arrays or tensors, or a ``torch.utils.data.Dataset`` of ``(data, target)``. Required.

        ``dataset`` is a pandas DataFrame for a CSV dataset, an
        ``fedlab.training.data.ImageFolderData`` for an image folder. Floating arrays become
        float32 tensors and integer arrays int64 tensors.
        """
        raise NotImplementedError(f"{type(self).__name__} must define training_data(self, dataset)")

    def training_step(self, data: Any, target: Any) -> torch.Tensor:
        """The scalar loss of one batch; the loop calls ``backward`` and steps the optimizer. Required."""
        raise NotImplementedError(f"{type(self).__name__} must define training_step(self, data, target)")

    def testing_step(self, data: Any, target: Any) -> dict[str, Any] | torch.Tensor:
        """Metrics of one test batch (floats or scalar tensors), averaged by the loop weighted by batch size.

        By default the training loss, ``{"loss": ...}``. The loop calls it in eval mode under
        ``torch.no_grad()``.
        """
        return {"loss": self.training_step(data, target)}
