"""Node-side state kept between rounds (optimizer moments, Scaffold's control variates), without pickle.

``torch.save`` would pickle, and a node never unpickles. A state is instead a blob of a
small msgpack header (the ``NamedArray`` specs of its arrays and a JSON-like ``meta``
dict) followed by the arrays' raw bytes, the same description arrays have on the wire.
An optimizer's ``state_dict`` is flattened into that shape: tensor leaves become arrays
named ``state.<param index>.<key>`` and everything else (hyperparameters, plain numbers)
goes into ``meta``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from fedlab.errors import FedlabError, FedlabTrainingError
from fedlab.protocol.arrays import unpack_array
from fedlab.training.messages import NamedArray
from fedlab.training.tensors import pack_named

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["decode_state", "encode_state", "load_optimizer_state", "optimizer_state"]

_MAGIC = b"fedlab-state\x01"
_LENGTH_BYTES = 8


class _Header(msgspec.Struct, forbid_unknown_fields=True):
    arrays: list[NamedArray]
    meta: dict[str, Any]


def encode_state(arrays: Mapping[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    """One blob holding ``arrays`` and the JSON-like ``meta``; ``decode_state`` reverses it."""
    specs, frames = pack_named(arrays)
    try:
        header = msgspec.msgpack.encode(_Header(arrays=specs, meta=meta))
    except (TypeError, ValueError, OverflowError) as exc:
        raise FedlabTrainingError(f"training state cannot be stored: its meta data is not plain data ({exc})") from exc
    return b"".join([_MAGIC, len(header).to_bytes(_LENGTH_BYTES, "little"), header, *frames])


def decode_state(blob: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays, meta)`` of a blob from ``encode_state``; the arrays are read-only views of ``blob``."""
    view = memoryview(blob).cast("B")
    start = len(_MAGIC) + _LENGTH_BYTES
    if len(view) < start or bytes(view[: len(_MAGIC)]) != _MAGIC:
        raise FedlabTrainingError("stored training state is not a fedlab state blob; start the experiment again")
    length = int.from_bytes(view[len(_MAGIC) : start], "little")
    try:
        header = msgspec.msgpack.decode(view[start : start + length], type=_Header)
        offset = start + length
        frames: list[memoryview] = []
        for named in header.arrays:
            size = math.prod(named.array.shape) * np.dtype(named.array.dtype).itemsize
            frames.append(view[offset : offset + size])
            offset += size
        if offset > len(view):
            raise FedlabTrainingError(f"stored training state is corrupt ({offset - len(view)} bytes missing)")
        if offset < len(view):
            raise FedlabTrainingError(f"stored training state has {len(view) - offset} bytes too many")
        arrays = {}
        for named in header.arrays:
            if named.name in arrays:
                raise FedlabTrainingError(f"stored training state holds array {named.name!r} twice")
            arrays[named.name] = unpack_array(named.array, frames)
    except (msgspec.DecodeError, TypeError) as exc:
        raise FedlabTrainingError(f"stored training state is corrupt ({exc}); start the experiment again") from exc
    except FedlabTrainingError:
        raise
    except FedlabError as exc:
        raise FedlabTrainingError(f"stored training state is corrupt ({exc}); start the experiment again") from exc
    return arrays, header.meta


def _plain(value: Any, where: str) -> Any:
    """``value`` as msgpack-able plain data (tuples become lists), or a clear error naming ``where``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a numpy or torch scalar
        return _plain(value.item(), where)
    raise FedlabTrainingError(
        f"optimizer state {where} is a {type(value).__name__}, which cannot be kept between rounds; "
        "use plain numbers as optimizer hyperparameters"
    )


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``optimizer.state_dict()`` flattened into arrays (copies of the tensor leaves) and plain meta."""
    import torch

    state_dict = optimizer.state_dict()
    arrays: dict[str, np.ndarray] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                host = value.detach().cpu().numpy()  # from a GPU, a copy already
                arrays[f"state.{index}.{key}"] = host.copy() if value.device.type == "cpu" else host
            else:
                plain_state.setdefault(str(index), {})[key] = _plain(value, f"state.{index}.{key}")
    groups = [_plain(group, f"param_groups[{i}]") for i, group in enumerate(state_dict["param_groups"])]
    return arrays, {"state": plain_state, "param_groups": groups}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    *,
    keep_hyperparameters: bool = True,
) -> None:
    """Restore what ``optimizer_state`` saved into a freshly built ``optimizer`` of the same model.

    With ``keep_hyperparameters`` (the default) the optimizer keeps its current
    hyperparameters (learning rate, momentum...) and only its per-parameter state (moments,
    step counts) is restored: a researcher who changes ``optimizer_args`` between rounds
    gets the new values. The arrays are copied, never shared.
    """
    import torch

    state: dict[int, dict[str, Any]] = {}
    for index, per_param in dict(meta.get("state", {})).items():
        state.setdefault(int(index), {}).update(per_param)
    for name, array in arrays.items():
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise FedlabTrainingError(f"optimizer state array {name!r} is not named state.<index>.<key>")
        state.setdefault(int(parts[1]), {})[parts[2]] = torch.tensor(array)
    saved_groups = list(meta.get("param_groups", []))
    current = optimizer.state_dict()["param_groups"]
    if len(saved_groups) != len(current) or any(
        len(s.get("params", [])) != len(c["params"]) for s, c in zip(saved_groups, current, strict=False)
    ):
        raise FedlabTrainingError(
            "the saved optimizer state does not fit this optimizer (its parameter groups differ); "
            "the plan's init_optimizer must build the same optimizer every round"
        )
    groups = current if keep_hyperparameters else saved_groups
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise FedlabTrainingError(f"the saved optimizer state cannot be loaded into this optimizer: {exc}") from exc
