"""Breakpoints: an experiment saved between rounds, to resume in a new process.

A breakpoint is a directory, written atomically (a temporary directory renamed into place,
so a crash leaves the previous breakpoint intact, never half of a new one)::

    breakpoint.json   format version, experiment id, tags, plan source and class, model,
                      training and aggregator arguments, rounds, round done, each node's
                      state_id, node ids, the history so far
    params.npz        the global parameters
    aggregator.npz    the aggregator's own arrays (Scaffold's control variate, a server
                      optimizer's moments ``m`` and ``v``); its other state (a server
                      optimizer's step count) is ``aggregator_meta`` in the JSON

Arrays are stored under neutral keys (``a0``, ``a1``...) with their real names in the JSON,
so no parameter name can clash with ``np.savez``'s own arguments, and they are read back
with ``allow_pickle=False``: nothing is ever unpickled. An experiment started with
``breakpoint_dir`` saves one ``round-NNNN`` directory per round in it; loading that folder
picks the latest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from fedlab.errors import FedlabError

__all__ = ["FORMAT_VERSION", "Breakpoint", "find_breakpoint", "read_breakpoint", "write_breakpoint"]

FORMAT_VERSION = 1
JSON_FILE, PARAMS_FILE, AGGREGATOR_FILE = "breakpoint.json", "params.npz", "aggregator.npz"
_ROUND_DIR = re.compile(r"^round-(\d+)$")


class Breakpoint(msgspec.Struct, forbid_unknown_fields=True):
    """What ``breakpoint.json`` holds; the arrays travel beside it (see ``write_breakpoint``)."""

    experiment_id: str
    tags: list[str]
    nodes: list[str] | None
    node_ids: list[str]
    plan_source: str
    plan_class: str
    model_args: dict[str, Any]
    training_args: dict[str, Any]
    aggregator: str
    aggregator_args: dict[str, Any]
    aggregator_meta: dict[str, Any]
    rounds: int
    round_current: int
    state_ids: dict[str, str | None]
    history: list[dict[str, Any]]
    round_timeout: float
    share_persistent_buffers: bool
    breakpoint_dir: str | None = None
    disconnect_grace: float = 10.0  # Experiment's default, for breakpoints written before it was kept
    format_version: int = FORMAT_VERSION
    param_names: list[str] = []
    aggregator_names: list[str] = []
    secagg: bool = False  # a securely aggregated experiment resumes securely aggregated
    secagg_arguments: dict[str, Any] = {}


def _what_to_do(path: Path) -> str:
    return (f"Resume from another breakpoint (an earlier round-NNNN folder next to {path}) or start the "
            "experiment again.")


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> list[str]:
    names = list(arrays)
    with open(path, "wb") as f:
        stored: dict[str, Any] = {f"a{i}": np.asarray(arrays[n]) for i, n in enumerate(names)}
        np.savez(f, allow_pickle=False, **stored)
        f.flush()
        os.fsync(f.fileno())
    return names


def _load_npz(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:  # our handle: closed even on a bad file
            return {name: np.array(data[f"a{i}"]) for i, name in enumerate(names)}
    except FileNotFoundError:
        raise FedlabError(f"the breakpoint file {path} is missing. {_what_to_do(path.parent)}") from None
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as exc:
        raise FedlabError(f"the breakpoint file {path} is corrupt ({type(exc).__name__}: {exc}). "
                          f"{_what_to_do(path.parent)}") from None


def write_breakpoint(bp: Breakpoint, params: dict[str, np.ndarray], aggregator_arrays: dict[str, np.ndarray],
                     path: str | os.PathLike[str]) -> Path:
    """Write the breakpoint directory ``path`` (replacing it), atomically; return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        meta = msgspec.structs.replace(bp, format_version=FORMAT_VERSION,
                                       param_names=_save_npz(tmp / PARAMS_FILE, params),
                                       aggregator_names=_save_npz(tmp / AGGREGATOR_FILE, aggregator_arrays))
        with open(tmp / JSON_FILE, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(meta), indent=1))
            f.flush()
            os.fsync(f.fileno())
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}-old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def find_breakpoint(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if it is a breakpoint, else its latest ``round-NNNN`` breakpoint."""
    root = Path(path)
    if (root / JSON_FILE).is_file():
        return root
    if not root.is_dir():
        raise FedlabError(f"no breakpoint at {root}: the folder does not exist. Give the folder an experiment "
                          "saved into (its breakpoint_dir) or one of its round-NNNN folders.")
    rounds = sorted((int(m.group(1)), p) for p in root.iterdir()
                    if (m := _ROUND_DIR.match(p.name)) and (p / JSON_FILE).is_file())
    if not rounds:
        raise FedlabError(f"no breakpoint in {root}: it has no {JSON_FILE} and no round-NNNN folder holding one. "
                          "Give the folder an experiment saved into (its breakpoint_dir).")
    return rounds[-1][1]


def read_breakpoint(path: str | os.PathLike[str]) -> tuple[Breakpoint, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(breakpoint, params, aggregator_arrays)`` from ``path`` (or the latest breakpoint under it).

    Raises FedlabError saying what to do when the breakpoint is missing, corrupt or from
    another format version.
    """
    where = find_breakpoint(path)
    try:
        raw = (where / JSON_FILE).read_bytes()
        version = json.loads(raw).get("format_version")
    except (OSError, ValueError, AttributeError) as exc:
        raise FedlabError(f"the breakpoint {where / JSON_FILE} is unreadable ({exc}). {_what_to_do(where)}") from None
    if version != FORMAT_VERSION:
        raise FedlabError(f"the breakpoint {where} has format version {version!r}; this fedlab reads version "
                          f"{FORMAT_VERSION}. Resume it with the fedlab version that wrote it.")
    try:
        bp = msgspec.json.decode(raw, type=Breakpoint)
    except msgspec.ValidationError as exc:
        raise FedlabError(f"the breakpoint {where / JSON_FILE} is invalid: {exc}. {_what_to_do(where)}") from None
    params = _load_npz(where / PARAMS_FILE, bp.param_names)
    aggregator_arrays = _load_npz(where / AGGREGATOR_FILE, bp.aggregator_names)
    if not params:
        raise FedlabError(f"the breakpoint {where} holds no model parameters. {_what_to_do(where)}")
    return bp, params, aggregator_arrays
