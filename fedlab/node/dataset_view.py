"""A dataset as one request sees it: the cached source file, the chain of preprocessing steps that
made it, and each column's provenance (see :mod:`fedlab.privacy.provenance`).

Analytics and preprocessing both answer from the *root* source transformed by the chain, so
that every rule follows the data, not the names. CSV files are read once and cached, with a
digest of their content, until the file changes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from fedlab.errors import FedlabDatasetError, FedlabError
from fedlab.node.registry import DatasetRecord
from fedlab.privacy.provenance import OTHER_CATEGORY, Origin, track

__all__ = ["CsvCache", "LoadedData", "apply_tracked"]

log = logging.getLogger("fedlab.node")


class CsvCache:
    """DataFrames of registered CSV datasets, re-read only when the file changes, with a digest
    of the file's content (the noise and the threshold state of a dataset follow its content)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frames: dict[str, tuple[tuple[int, int], pd.DataFrame, str]] = {}

    def load(self, path: str) -> pd.DataFrame:
        return self.load_with_digest(path)[0]

    def load_with_digest(self, path: str) -> tuple[pd.DataFrame, str]:
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise FedlabDatasetError(
                f"the dataset's file is no longer readable on this node ({exc.strerror}); "
                "the node's operator should register it again"
            ) from None
        key = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._frames.get(path)
            if cached is not None and cached[0] == key:
                return cached[1], cached[2]
        if not os.path.isfile(path):
            raise FedlabDatasetError("the dataset's file is no longer a readable file on this node; "
                                     "the node's operator should register it again")
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        frame = pd.read_csv(path)
        with self._lock:
            self._frames[path] = (key, frame, digest.hexdigest())
        return frame, digest.hexdigest()


@dataclass(frozen=True)
class LoadedData:
    """A dataset as a request sees it: the frame, each column's origin, and its root source."""

    frame: pd.DataFrame
    origins: dict[str, Origin]
    source: pd.DataFrame
    root: DatasetRecord
    digest: str
    chain: list[dict[str, Any]]

    @property
    def source_key(self) -> str:
        return f"{self.root.dataset_id}:{self.digest[:32]}"


def apply_tracked(frame: pd.DataFrame, origins: dict[str, Origin], chain: Sequence[Mapping[str, Any]],
                  ) -> tuple[pd.DataFrame, dict[str, Origin]]:
    """``frame`` transformed by ``chain`` (a copy), with the origins carried along."""
    from fedlab.preprocessing.transforms import apply_transform

    out = frame.copy()
    for spec in chain:
        try:
            out = apply_transform(out, spec)
        except FedlabError:
            raise
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("preprocessing chain failed on this node: %s: %s", type(exc).__name__, exc)
            raise FedlabDatasetError(
                f"the preprocessing chain cannot be applied to this node's data (its {spec.get('type')} step "
                "failed; the node's log has the details); check the step's columns and parameters, or start "
                "the pipeline again") from exc
        if spec.get("type") == "onehot":
            out = _fold(out, spec)
        origins = track(origins, spec)
    return out, origins


def _fold(frame: pd.DataFrame, spec: Mapping[str, Any]) -> pd.DataFrame:
    """Move the rows of the levels this node folded (see :mod:`fedlab.privacy.spec_check`) from their
    indicator columns, which stay all zeros, to ``<other>``."""
    folded = spec.get("folded")
    if not isinstance(folded, Mapping):
        return frame
    for column, levels in folded.items():
        other = f"{column}={OTHER_CATEGORY}"
        for level in levels if isinstance(levels, list) else []:
            name = f"{column}={level}"
            if name in frame.columns and other in frame.columns:
                frame[other] = np.maximum(frame[other].to_numpy(), frame[name].to_numpy())
                frame[name] = 0.0
    return frame
