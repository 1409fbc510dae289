"""LocalJob: the same training plan on data the researcher holds, without any node.

It exists to compare against: run it on pooled data to see what centralised training would
reach, or on one node's data to check that the federation changes nothing. It calls the
very function a node runs (``fedlab.training.loop.run_round``) with the same initial model
(seeded by ``training_args["seed"]``), the same round numbers (from 1) and the state a node
would keep between rounds, so one FedAvg round on one node equals one LocalJob round.
The two torch-side helpers the researcher needs live here too (``training_loop``, which
says clearly that torch is missing, and ``build_model``), shared with ``Experiment``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedlab.errors import FedlabError, FedlabTrainingError
from fedlab.researcher.training_jobs import NodeRound
from fedlab.researcher.training_tables import history_frame, history_row
from fedlab.training.source import load_plan_class, plan_error, plan_source

__all__ = ["LocalJob", "build_model", "training_loop"]

LOCAL = "local"


def training_loop() -> Any:
    """The training loop module; the researcher needs torch to build models and train locally."""
    try:
        from fedlab.training import loop
    except ImportError as exc:
        raise FedlabTrainingError(
            f"training needs torch on the researcher's side too ({exc}); install it with "
            "`pip install 'fedlab-research[torch]'`") from None
    return loop


def build_model(plan_cls: type, model_args: Mapping[str, Any], params: Mapping[str, np.ndarray]) -> Any:
    """A torch module of ``plan_cls``'s model holding ``params`` (e.g. the global parameters)."""
    import torch

    from fedlab.training.convert import load_params

    with torch.random.fork_rng(devices=[]):  # leave the caller's random state as it was
        try:
            module = plan_cls().init_model(dict(model_args))
        except Exception as exc:
            raise plan_error(plan_cls, "init_model", exc) from exc
    load_params(module, params, list(params))
    return module


def _load(dataset: Any) -> Any:
    """A DataFrame or ImageFolderData as the nodes give it to a plan: paths are read as nodes read them."""
    from fedlab.training.data import ImageFolderData, load_dataset

    if isinstance(dataset, pd.DataFrame | ImageFolderData):
        return dataset
    if isinstance(dataset, str | os.PathLike):
        path = Path(dataset)
        return load_dataset("images" if path.is_dir() else "csv", str(path))
    raise FedlabError(f"LocalJob needs a CSV path, a DataFrame, an image folder path or an ImageFolderData, "
                      f"not {type(dataset).__name__}")


class LocalJob:
    """Train ``training_plan`` on ``dataset`` here for ``rounds`` rounds, as one node would."""

    def __init__(self, dataset: Any, training_plan: type | str, model_args: Mapping[str, Any] | None = None,
                 training_args: Mapping[str, Any] | None = None, rounds: int = 1, *, plan_class: str | None = None,
                 share_persistent_buffers: bool = True, on_progress: Callable[[Any], None] | None = None) -> None:
        loop = training_loop()
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
            raise FedlabError(f"rounds must be a positive integer, got {rounds!r}")
        self._loop = loop
        self.dataset = _load(dataset)
        self.plan_source, self.plan_class = plan_source(training_plan, plan_class)
        self._plan_cls = load_plan_class(self.plan_source, self.plan_class)
        self.model_args = dict(model_args or {})
        self.training_args = dict(training_args or {})
        loop.TrainingArgs.from_dict(self.training_args)
        self.rounds = rounds
        self.share_persistent_buffers = share_persistent_buffers
        self.on_progress = on_progress
        self.round_current = 0
        self.params: dict[str, np.ndarray] = loop.initial_params(
            self._plan_cls, self.model_args, seed=int(self.training_args.get("seed", 0)),
            share_persistent_buffers=share_persistent_buffers)
        self._state: tuple[dict[str, np.ndarray], dict[str, Any]] = ({}, {})
        self._records: list[dict[str, Any]] = []

    @property
    def history(self) -> pd.DataFrame:
        """One row per round, with the same columns as ``Experiment.history``."""
        return history_frame(self._records)

    def _round(self, round_: int, do_training: bool) -> Any:
        result = self._loop.run_round(
            self._plan_cls, self.dataset, round=round_, model_args=self.model_args,
            training_args=self.training_args, params=self.params, state_arrays=self._state[0],
            state_meta=self._state[1], do_training=do_training,
            share_persistent_buffers=self.share_persistent_buffers, progress=self.on_progress)
        row = NodeRound(LOCAL, "ok", n_samples=result.n_samples, n_test_samples=result.n_test_samples,
                        n_updates=result.n_updates, train_loss=result.train_loss,
                        metrics_before=result.metrics_before, metrics_after=result.metrics_after,
                        compute_seconds=result.compute_seconds, device=result.device,
                        device_note=result.device_note)
        self._records.append(history_row(round_, "training" if do_training else "validation", LOCAL, LOCAL, row))
        return result

    def run(self) -> dict[str, np.ndarray]:
        """Run the rounds not run yet; return the final parameters."""
        while self.round_current < self.rounds:
            result = self._round(self.round_current + 1, True)
            self.params = dict(result.params)
            self._state = (dict(result.state_arrays), dict(result.state_meta))
            self.round_current += 1
            args = self.training_args
            if self.round_current == self.rounds and args.get("test_on_global_updates") and args.get("test_ratio"):
                self._round(self.round_current + 1, False)
        return dict(self.params)

    def model(self) -> Any:
        """A torch module of the plan's model holding the current parameters."""
        return build_model(self._plan_cls, self.model_args, self.params)
