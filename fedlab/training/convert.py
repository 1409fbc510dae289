"""numpy <-> torch for the training loop: parameters in and out of a model, a plan's data as batches.

Received parameters are read-only views of message frames. Turning them into tensors with
``torch.as_tensor`` would share memory torch may not write (and warn about it), so they are
copied straight into the model's own tensors instead: one copy, no warning, the frames
untouched. The training worker owns its frames (the node's memory file lent for the round,
see ``fedlab.training.worker_wire``) and asks for them to be *adopted*: a frame of the tensor's
dtype becomes the tensor's memory, no copy, and training updates it in place. Parameters going
out are detached CPU copies, independent of the model, or views of the model's memory.

A plan's ``training_data`` may return ``(X, y)`` (arrays, tensors or pandas objects) or a
torch ``Dataset``. Arrays are batched by indexing whole tensors, which is much faster than
a ``DataLoader`` fetching and collating one row at a time; a ``Dataset`` goes through a
``DataLoader`` with ``num_workers=0``. Both shuffle with the generator the loop passes in,
so the order of batches is a function of the seed and the round only. On a GPU (``PlanData.place``)
the batches are on the device: ``(X, y)`` up to 1 GiB moved there whole once, larger ones and a
``Dataset``'s batches moved one batch at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from fedlab.errors import FedlabTrainingError

__all__ = ["PlanData", "batch_size_of", "load_params", "model_params", "shared_param_names", "to_device",
           "to_tensor", "torch_dtype"]

_RESIDENT_BYTES = 1 << 30  # a plan's (X, y) up to this size moves to the training device whole, once per round


def shared_param_names(model: torch.nn.Module, share_persistent_buffers: bool) -> list[str]:
    """Names of the ``state_dict`` entries that travel: parameters, plus persistent buffers if asked.

    Persistent buffers are state such as BatchNorm's running statistics; non-persistent
    buffers never are in a ``state_dict``.
    """
    names = list(model.state_dict().keys())
    if share_persistent_buffers:
        return names
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return [name for name in names if name in parameters]


def model_params(model: torch.nn.Module, names: list[str], *, copy: bool = True) -> dict[str, np.ndarray]:
    """Detached CPU numpy copies of the ``state_dict`` entries ``names``, in the model's dtypes.

    ``copy=False`` returns views of the model's own memory instead (no copy of a 100 MB
    model): for a model nobody touches afterwards, like the one a round builds and drops.
    """
    state = model.state_dict()
    out: dict[str, np.ndarray] = {}
    for name in names:
        tensor = state[name].detach().cpu()
        try:
            out[name] = tensor.numpy().copy() if copy else tensor.numpy()
        except TypeError as exc:
            raise FedlabTrainingError(
                f"model entry {name} has dtype {tensor.dtype}, which cannot be sent; use float32 or float64"
            ) from exc
    return out


def load_params(model: torch.nn.Module, params: Mapping[str, np.ndarray], names: list[str], *,
                adopt: bool = False) -> None:
    """Copy ``params`` into the model's tensors; the names must be exactly ``names``, with the same shapes.

    ``adopt``: an array that is writable, C-contiguous, aligned and of the tensor's dtype, for a
    contiguous CPU tensor, becomes that tensor's memory instead of being copied (``tensor.data``
    is replaced; the Parameter object stays, so an optimizer made afterwards, and tied weights,
    see it). The model then reads and writes the caller's memory: only for a caller that owns
    the arrays and leaves them to the model. Others (a cast, a non-contiguous tensor, a tensor on
    a GPU) are copied; to a GPU straight from the array.
    """
    missing = [n for n in names if n not in params]
    expected = set(names)
    extra = [n for n in params if n not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}" + (" …" if len(missing) > 5 else ""))
        if extra:
            parts.append(f"unexpected {', '.join(extra[:5])}" + (" …" if len(extra) > 5 else ""))
        raise FedlabTrainingError(
            f"the parameters received do not match the plan's model ({'; '.join(parts)}); "
            "check that model_args and the plan are the ones the parameters were made with"
        )
    state = model.state_dict(keep_vars=True)  # the model's own Parameters and buffers, not detached aliases
    with torch.no_grad():
        for name in names:
            array, tensor = np.asarray(params[name]), state[name]
            if tuple(array.shape) != tuple(tensor.shape):
                raise FedlabTrainingError(
                    f"parameter {name} received with shape {list(array.shape)} but the model's has shape "
                    f"{list(tensor.shape)}; check model_args"
                )
            if adopt and _adoptable(array, tensor):
                tensor.data = torch.from_numpy(array)
            elif tensor.device.type == "cpu" and tensor.dtype != torch.bfloat16:  # numpy has no bfloat16
                np.copyto(tensor.detach().numpy(), array, casting="unsafe")
            elif array.flags.writeable and torch_dtype(array.dtype) is not None:
                tensor.copy_(torch.from_numpy(array))  # straight from the frame to the device (or a cast)
            else:
                tensor.copy_(torch.tensor(array))


@functools.cache
def torch_dtype(dtype: np.dtype[Any]) -> torch.dtype | None:
    """The torch dtype of tensors over arrays of ``dtype`` (``torch.from_numpy``), None if there is none."""
    try:
        return torch.from_numpy(np.empty(0, dtype)).dtype
    except (TypeError, ValueError):  # a dtype (or byte order) torch has no tensors of
        return None


def _adoptable(array: np.ndarray, tensor: torch.Tensor) -> bool:
    """Whether ``array`` can be ``tensor``'s memory as it is (see ``load_params``)."""
    return (array.size > 0 and array.flags.writeable and array.flags.c_contiguous and array.flags.aligned
            and array.dtype.isnative and type(tensor) in (torch.Tensor, torch.nn.Parameter)
            and tensor.layout == torch.strided and tensor.device.type == "cpu" and tensor.is_contiguous()
            and torch_dtype(array.dtype) == tensor.dtype)


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with its tensors on ``device``: a tensor, or lists, tuples and dicts of them (as a
    ``Dataset``'s batches may be); anything else is returned as it is. A no-op where they already are."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(to_device(v, device) for v in value))
    if isinstance(value, list | tuple):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def to_tensor(value: Any, what: str) -> torch.Tensor:
    """An array, tensor or pandas object as a tensor: floats become float32, integers int64.

    Read-only arrays are copied (torch cannot wrap them safely); writable ones of the right
    dtype are shared.
    """
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    else:
        if hasattr(value, "to_numpy"):
            value = value.to_numpy()
        array = np.asarray(value)
        if array.dtype.kind == "f" and array.dtype != np.float32:
            array = array.astype(np.float32)
        elif array.dtype.kind in "iu" and array.dtype != np.int64:
            array = array.astype(np.int64)
        elif array.dtype.kind not in "fiub":
            raise FedlabTrainingError(
                f"training_data returned {what} of dtype {array.dtype}; it must be numeric "
                "(encode text or categorical columns as numbers in training_data)"
            )
        tensor = torch.from_numpy(array) if array.flags.writeable else torch.tensor(array)
    if tensor.is_floating_point() and tensor.dtype != torch.float32:
        tensor = tensor.float()
    elif not tensor.is_floating_point() and tensor.dtype not in (torch.int64, torch.bool):
        tensor = tensor.long()
    return tensor


class PlanData:
    """What a plan's ``training_data`` returned, ready to be batched over subsets of its indices."""

    def __init__(self, returned: Any) -> None:
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.dataset: Dataset[Any] | None = None
        self.device: torch.device | None = None  # where batches go (None: where they are)
        if isinstance(returned, tuple) and len(returned) == 2:
            self.x, self.y = to_tensor(returned[0], "X"), to_tensor(returned[1], "y")
            if self.x.dim() == 0 or self.y.dim() == 0 or len(self.x) != len(self.y):
                raise FedlabTrainingError(
                    f"training_data returned X of shape {list(self.x.shape)} and y of shape "
                    f"{list(self.y.shape)}; they need the same number of rows"
                )
            self.n = len(self.x)
        elif isinstance(returned, Dataset) and hasattr(returned, "__len__"):
            self.dataset = returned
            self.n = len(returned)
        else:
            raise FedlabTrainingError(
                "training_data must return (X, y) or a torch Dataset with __len__, "
                f"not {type(returned).__name__}"
            )

    def place(self, device: torch.device) -> None:
        """Give batches on ``device`` from now on; ``(X, y)`` small enough move there whole, now."""
        self.device = device
        if self.x is not None and self.y is not None and (self.x.device != device or self.y.device != device):
            size = self.x.element_size() * self.x.nelement() + self.y.element_size() * self.y.nelement()
            if size <= _RESIDENT_BYTES:
                self.x, self.y = self.x.to(device), self.y.to(device)

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows ``index`` (an int64 tensor) of ``(X, y)`` as one batch, on the device of ``place``."""
        assert self.x is not None and self.y is not None
        x, y = self.x, self.y
        data = x[index if index.device == x.device else index.to(x.device)]
        target = y[index if index.device == y.device else index.to(y.device)]
        if self.device is None:
            return data, target
        return to_device(data, self.device), to_device(target, self.device)

    def batches(
        self, indices: np.ndarray, batch_size: int, shuffle: bool, generator: torch.Generator
    ) -> Iterator[tuple[Any, Any]]:
        """``(data, target)`` batches over ``indices``, in an order drawn from ``generator`` (a CPU one:
        the order is the same on every device)."""
        if self.x is not None and self.y is not None:
            order = torch.from_numpy(np.array(indices, dtype=np.int64))
            if shuffle:
                order = order[torch.randperm(len(order), generator=generator)]
            order = order.to(self.x.device)  # (X, y) moved to a GPU whole: the rows are picked there
            for start in range(0, len(order), batch_size):
                yield self.rows(order[start : start + batch_size])
            return
        assert self.dataset is not None
        loader = DataLoader(
            Subset(self.dataset, indices.tolist()),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=0,
        )
        for batch in loader:
            if not isinstance(batch, list | tuple) or len(batch) != 2:
                raise FedlabTrainingError(
                    "the Dataset returned by training_data must yield (data, target) pairs, "
                    f"got batches of type {type(batch).__name__}"
                    + (f" with {len(batch)} items" if isinstance(batch, list | tuple) else "")
                )
            if self.device is None:
                yield batch[0], batch[1]
            else:
                yield to_device(batch[0], self.device), to_device(batch[1], self.device)


def batch_size_of(target: Any) -> int:
    """How many samples a batch holds, for weighting metrics: the length of its target."""
    if isinstance(target, torch.Tensor):
        return int(target.shape[0]) if target.dim() > 0 else 1
    try:
        return len(target)
    except TypeError:
        return 1
