"""Moving a round's tensors to the device it trains on, and its parameters back to CPU memory.

Parameters travel as CPU buffers. On the CPU, the training worker's received frames *are* the
model's memory (``load_params(adopt=True)``): nothing is copied. On a GPU the model lives in
device memory instead: the received frames are copied there once (``load_params`` copies into the
device tensors), and at the end of the round the trained entries are copied back into those very
frames (:func:`params_to_host`), so the reply's frames stay in the memory file the node lent for the
round, just as on the CPU. Batches are moved as they are drawn; a plan's ``(X, y)`` tensors are
moved to the device whole, once per round, when they are small enough
(``fedlab.training.convert.PlanData.place``), which spares a transfer per batch.

Device-generic: nothing here names CUDA but the seeding of its generator, so the same code runs on
the CPU (in CI) and on torch's ``meta`` device (shapes only, for tests).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedlab.training.convert import model_params, to_device, torch_dtype

__all__ = ["is_host", "params_to_host", "seed_device", "to_device", "torch_device"]


def torch_device(name: str | torch.device) -> torch.device:
    """``name`` as a ``torch.device`` (``"cuda"`` becomes ``cuda:0``, so devices compare equal)."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", 0)
    return device


def is_host(device: torch.device) -> bool:
    """Whether tensors on ``device`` are in CPU memory (where received frames can be adopted)."""
    return device.type == "cpu"


def seed_device(device: torch.device, seed: int) -> None:
    """Seed the generator of ``device`` that dropout and the like draw from there (the CPU's is seeded
    apart); only that device's, as ``torch.manual_seed`` would set up every GPU."""
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)


def params_to_host(model: torch.nn.Module, names: list[str], received: Mapping[str, np.ndarray] | None,
                   adopt: bool) -> dict[str, np.ndarray]:
    """The shared entries ``names`` of a trained model as CPU arrays that nothing else uses.

    With ``adopt`` (the caller owns ``received`` and reads them no more), each entry ends in its
    received array wherever that array can hold it (writable, contiguous, of the entry's shape and
    dtype), which is then the result: for free where the model trained in it (the CPU), copied there
    otherwise (a GPU). Other entries, and all without ``adopt``, are views of the model's memory on
    the CPU and fresh copies from a GPU.
    """
    state = model.state_dict()
    out: dict[str, np.ndarray] = {}
    for name in names:
        tensor = state[name].detach()
        target = received.get(name) if adopt and received is not None else None
        if target is not None and _holds(target, tensor):
            if not _is_memory_of(tensor, target):
                torch.from_numpy(target).copy_(tensor)
            out[name] = target
        else:
            out.update(model_params(model, [name], copy=False))  # the model is dropped after the round
    return out


def _holds(array: np.ndarray, tensor: torch.Tensor) -> bool:
    """Whether ``array`` can take ``tensor``'s values as they are (no cast, no reshape)."""
    return (array.size > 0 and array.flags.writeable and array.flags.c_contiguous and array.flags.aligned
            and array.dtype.isnative and tuple(array.shape) == tuple(tensor.shape)
            and torch_dtype(array.dtype) == tensor.dtype)


def _is_memory_of(tensor: torch.Tensor, array: np.ndarray) -> bool:
    """Whether ``tensor`` is ``array``'s own bytes (an adopted frame the model trained in)."""
    return (is_host(tensor.device) and tensor.is_contiguous() and tensor.data_ptr() == array.ctypes.data)
