"""Where a round trains: the node operator's ``device`` setting, the researcher's ``use_gpu``, and the GPUs torch sees.

The operator's setting is the rule, ``use_gpu`` a request within it (see docs/gpu.md):

* ``"auto"`` (the default): a round with ``use_gpu=True`` trains on the first GPU when torch sees
  one, and on the CPU with a note when it sees none; a round without trains on the CPU.
* ``"cpu"``: every round trains on the CPU; one that asked ``use_gpu=True`` says so in a note.
* ``"cuda"`` / ``"cuda:N"``: every round trains on that GPU, ``use_gpu`` or not (a note says so
  when the round did not ask for it); a node whose torch sees no such GPU fails the round with an
  error telling its operator what to set, rather than train silently, and much slower, on the CPU.

Pure Python (no torch): the node's config is checked with :func:`check_device_setting` where torch
is not imported, and :func:`choose_device` is given the number of GPUs the worker's torch counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedlab.errors import FedlabConfigError

__all__ = ["AUTO", "CPU", "CUDA", "DEVICE_SETTINGS", "DeviceChoice", "check_device_setting", "choose_device"]

AUTO, CPU, CUDA = "auto", "cpu", "cuda"
DEVICE_SETTINGS = '"auto", "cpu", "cuda" or "cuda:N" (N a GPU index: 0 for the first)'
_SETTING = re.compile(r"^(auto|cpu|cuda(?::([0-9]{1,3}))?)$")


def check_device_setting(value: object) -> str:
    """``value`` as a normalised device setting (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``); a
    ``FedlabConfigError`` saying what is allowed otherwise. Case and surrounding blanks do not matter."""
    text = value.strip().lower() if isinstance(value, str) else None
    match = _SETTING.match(text) if text is not None else None
    if match is None:
        raise FedlabConfigError(f"device {value!r} is not one of {DEVICE_SETTINGS}")
    if match.group(2) is not None:
        return f"{CUDA}:{int(match.group(2))}"
    return match.group(1)


@dataclass(frozen=True)
class DeviceChoice:
    """The torch device a round trains on (``"cpu"`` or ``"cuda:N"``) and, when it is not what the round
    asked for, a note saying why (``""`` otherwise); the note goes into the round's reply."""

    device: str
    note: str = ""


def choose_device(setting: str, use_gpu: bool, cuda_devices: int, *, owner: str = "this machine") -> DeviceChoice:
    """The device of a round under the operator's ``setting`` for a request with ``use_gpu``, where torch
    counts ``cuda_devices`` GPUs; ``owner`` names the machine in notes and errors (``"node hospital-a"``).

    ``FedlabConfigError`` when the operator set a GPU that torch does not see."""
    setting = check_device_setting(setting)
    if setting == CPU:
        note = (f"use_gpu: {owner} trains on the CPU only (its operator set device = \"cpu\"); this round "
                "trained on the CPU") if use_gpu else ""
        return DeviceChoice(CPU, note)
    if setting == AUTO:
        if not use_gpu:
            return DeviceChoice(CPU)
        if cuda_devices < 1:
            return DeviceChoice(CPU, f"use_gpu: {owner} has no CUDA GPU that torch can use; this round trained "
                                     "on the CPU")
        return DeviceChoice(f"{CUDA}:0")
    index = int(setting.partition(":")[2] or 0)
    if cuda_devices < 1:
        raise FedlabConfigError(
            f"{owner} is set to train on {setting} (device in its config.toml), but torch there sees no CUDA GPU; "
            "its operator installs a CUDA build of torch and the GPU's driver, or sets device = \"auto\" or "
            "\"cpu\" and restarts the node")
    if index >= cuda_devices:
        raise FedlabConfigError(
            f"{owner} is set to train on {setting} (device in its config.toml), but torch there sees "
            f"{cuda_devices} CUDA GPU{'s' if cuda_devices > 1 else ''} (cuda:0 to cuda:{cuda_devices - 1}); its "
            "operator sets one of those, or \"auto\", and restarts the node")
    device = f"{CUDA}:{index}"
    note = "" if use_gpu else (f"{owner} trains every round on its GPU (its operator set device = \"{setting}\"), "
                               f"so this round trained on {device} although use_gpu is False")
    return DeviceChoice(device, note)
