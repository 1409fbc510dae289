"""The values around one training round: its arguments, its progress events and its result.

``TrainingArgs`` arrive as a plain dict in ``TrainRequest.training_args``; ``from_dict``
checks every key and type at the door so a typo (``epoch=3``) is an error naming the key
and the valid ones, not a silently ignored setting. This module imports neither torch nor
the loop, so a researcher can validate arguments before sending anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlab.errors import FedlabTrainingError
from fedlab.privacy.dp_training import check_dp_args

__all__ = ["Progress", "RoundResult", "TrainingArgs"]

_MAX_SEED = 2**31


@dataclass(frozen=True)
class TrainingArgs:
    """How one node trains in one round.

    ``num_updates``, when set, is the number of optimizer steps and overrides ``epochs``.
    ``test_ratio`` of the rows (the same rows every round, drawn from ``seed``) are held out
    for validation, before local training (``test_on_global_updates``) and after it
    (``test_on_local_updates``). ``fedprox_mu`` adds FedProx's proximal term. ``use_gpu`` asks to
    train on the node's GPU, which the node's ``device`` setting allows or not (docs/gpu.md); the
    reply says which device trained.
    """

    epochs: int = 1
    batch_size: int = 32
    num_updates: int | None = None
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    test_ratio: float = 0.0
    test_on_global_updates: bool = False
    test_on_local_updates: bool = False
    seed: int = 0
    fedprox_mu: float | None = None
    progress_interval: float = 0.25
    shuffle: bool = True
    dp_args: dict[str, Any] | None = None
    use_gpu: bool = False

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> TrainingArgs:
        """Checked ``TrainingArgs`` from a plain dict; unknown keys and wrong types raise ``FedlabTrainingError``."""
        values = dict(values or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise FedlabTrainingError(
                f"unknown training argument{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"valid keys are {', '.join(sorted(valid))}"
            )
        checked = {key: _check(key, value) for key, value in values.items()}
        if checked.get("dp_args") is not None:
            exact = [k for k in ("test_on_global_updates", "test_on_local_updates") if checked.get(k)]
            if exact:
                raise FedlabTrainingError(
                    f"{' and '.join(exact)} cannot be used with dp_args: validation metrics are exact statistics "
                    "of a node's rows and would leave without the noise; set them to False and evaluate the "
                    "model on data of your own")
        return cls(**checked)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float | np.floating)


def _check(key: str, value: Any) -> Any:
    """Training argument ``key`` normalised (numpy scalars to Python), or an error saying what it must be."""

    def bad(must: str) -> FedlabTrainingError:
        return FedlabTrainingError(f"training argument {key} must be {must}, not {value!r}")

    if key in ("epochs", "batch_size") or (key == "num_updates" and value is not None):
        if not _is_int(value) or value < 1:
            raise bad("an integer >= 1" + (" or None" if key == "num_updates" else ""))
        return int(value)
    if key == "seed":
        if not _is_int(value) or not 0 <= value < _MAX_SEED:
            raise bad(f"an integer from 0 to {_MAX_SEED - 1}")
        return int(value)
    if key == "test_ratio":
        if not _is_number(value) or not 0 <= value < 1:
            raise bad("a number at least 0 and below 1")
        return float(value)
    if key == "progress_interval" or (key == "fedprox_mu" and value is not None):
        if not _is_number(value) or not value >= 0:
            raise bad("a number >= 0" + (" or None" if key == "fedprox_mu" else ""))
        return float(value)
    if key in ("test_on_global_updates", "test_on_local_updates", "shuffle", "use_gpu"):
        if not isinstance(value, bool | np.bool_):
            raise bad("True or False")
        return bool(value)
    if key == "dp_args":
        return check_dp_args(value)
    if key == "optimizer_args":
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise bad("a dict of keyword arguments for the optimizer")
        return dict(value)
    return value


@dataclass(frozen=True)
class Progress:
    """Where a round is: ``phase`` is ``"training"``, ``"validation before"`` or ``"validation after"``.

    ``iteration`` counts batches from 1 over the whole phase (``n_iterations`` in all);
    ``epoch`` and ``n_epochs`` are 0 during validation. ``loss`` is the last batch's training loss.
    """

    round: int
    phase: str
    epoch: int
    n_epochs: int
    iteration: int
    n_iterations: int
    loss: float | None = None


@dataclass
class RoundResult:
    """What one round produced, and what the node keeps for the next one (``state_arrays``, ``state_meta``).

    ``params`` are the shared ``state_dict`` entries after training (``{}`` when only
    validating); ``aux_vars`` are the aggregators' auxiliary variables, e.g.
    ``{"scaffold": {name: delta_c}}``. ``device`` is where the round trained (``"cpu"``, ``"cuda:0"``)
    and ``device_note`` why, when that is not what ``use_gpu`` asked for.
    """

    params: dict[str, np.ndarray]
    n_samples: int
    n_test_samples: int
    n_updates: int
    train_loss: float | None
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    aux_vars: dict[str, dict[str, np.ndarray]]
    state_arrays: dict[str, np.ndarray]
    state_meta: dict[str, Any]
    compute_seconds: float
    device: str = "cpu"
    device_note: str = ""
