"""The datasets a node has agreed to share, kept in the node's SQLite database.

The command line adds and removes datasets while a running node answers researchers from the
same file, so every operation runs in one transaction (on its thread's connection, kept open
between operations: :mod:`fedlab.node.db_connections`) and the
database is in WAL mode with a busy timeout: a reader never sees a half-registered dataset
and a writer waits for a moment instead of failing. A dataset is inspected before it is
registered (see :mod:`fedlab.node.inspect_data`), and its path stays on the node: what
leaves it is :meth:`DatasetRecord.to_info`, which has no path.
"""

from __future__ import annotations

import json
import os
import shlex
import sqlite3
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedlab.errors import FedlabConfigError, FedlabDatasetError
from fedlab.node.db_connections import pooled_connection
from fedlab.node.inspect_data import inspect_csv, inspect_images
from fedlab.protocol.messages import DatasetInfo

__all__ = ["DATA_TYPES", "SCHEMA_VERSION", "DatasetRecord", "DatasetRegistry", "create_schema"]

SCHEMA_VERSION = 1
DATA_TYPES = ("csv", "images")
MAX_NAME_LENGTH = 256
MAX_TAG_LENGTH = 128
MAX_DESCRIPTION_LENGTH = 65536
_BUSY_TIMEOUT_S = 5.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS datasets (
    dataset_id  TEXT PRIMARY KEY,
    name        TEXT UNIQUE NOT NULL,
    tags        TEXT NOT NULL,
    data_type   TEXT NOT NULL,
    path        TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    metadata    TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
"""
_INSERT = (
    "INSERT INTO datasets (dataset_id, name, tags, data_type, path, description, metadata, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_ALL = (
    "SELECT dataset_id, name, tags, data_type, path, description, metadata, created_at"
    " FROM datasets ORDER BY name"
)
# An id match wins over a name match, in case some dataset is named like another's id.
_SELECT_ONE = (
    "SELECT dataset_id, name, tags, data_type, path, description, metadata, created_at"
    " FROM datasets WHERE dataset_id = ? OR name = ? ORDER BY dataset_id = ? DESC"
)


@dataclass(frozen=True)
class DatasetRecord:
    """One registered dataset. ``path`` is absolute and never leaves the node."""

    dataset_id: str
    name: str
    tags: tuple[str, ...]
    data_type: str
    path: str
    description: str
    metadata: dict[str, Any] = field(hash=False)
    created_at: str

    @property
    def n_samples(self) -> int:
        return int(self.metadata.get("n_samples", 0))

    @property
    def shape(self) -> list[int]:
        return [int(n) for n in self.metadata.get("shape", [])]

    def to_info(self) -> DatasetInfo:
        """What the node tells a researcher about this dataset: everything but the path."""
        meta = self.metadata
        return DatasetInfo(
            dataset_id=self.dataset_id,
            name=self.name,
            tags=list(self.tags),
            data_type=self.data_type,
            shape=self.shape,
            description=self.description,
            columns=[str(c) for c in meta.get("columns", [])],
            dtypes={str(k): str(v) for k, v in meta.get("dtypes", {}).items()},
            n_samples=self.n_samples,
            classes=[str(c) for c in meta.get("classes", [])],
            image_shape=[int(n) for n in meta.get("image_shape", [])],
            channels=int(meta.get("channels", 0)),
            derived_from=str(meta.get("derived_from", "")),
            steps=[str(s) for s in meta.get("steps", [])],
        )

    @classmethod
    def _from_row(cls, row: sqlite3.Row | tuple[Any, ...]) -> DatasetRecord:
        dataset_id, name, tags, data_type, path, description, metadata, created_at = row
        try:
            tag_list, meta = json.loads(tags), json.loads(metadata)
        except (TypeError, ValueError) as exc:
            raise FedlabConfigError(
                f"the registry entry of dataset {name!r} is damaged ({exc}); remove it and add it again"
            ) from exc
        return cls(dataset_id, name, tuple(tag_list), data_type, path, description, meta, created_at)


RecordList = list[DatasetRecord]


def _translate(exc: sqlite3.Error, db_path: Path) -> Exception:
    """A readable fedlab error for a sqlite error on ``db_path``."""
    text = str(exc)
    if "locked" in text or "busy" in text:
        return FedlabDatasetError(
            f"the dataset registry {db_path} stayed busy for {_BUSY_TIMEOUT_S:g} s ({text}); try again"
        )
    return FedlabConfigError(
        f"the dataset registry {db_path} cannot be used ({text}); "
        "it may be damaged or not a fedlab node database"
    )


@contextmanager
def _connect(db_path: Path, *, create: bool = False) -> Iterator[sqlite3.Connection]:
    """A connection in autocommit mode (transactions are explicit), translated errors: the thread's
    pooled one (:mod:`fedlab.node.db_connections`), or a fresh one for ``create``."""
    if not create and not db_path.is_file():
        raise FedlabConfigError(
            f"no dataset registry at {db_path}: run "
            "`fedlab node init DIR --name NAME --researcher-key FILE` first (or `--insecure` for a local demo)"
        )
    try:
        if not create:  # this thread's open connection, if it has one (fedlab.node.db_connections)
            with pooled_connection(db_path, _BUSY_TIMEOUT_S) as conn:
                yield conn
            return
        with closing(sqlite3.connect(db_path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)) as conn:
            conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")  # a property of the file: set once, when it is made
            yield conn
    except sqlite3.Error as exc:
        raise _translate(exc, db_path) from exc


def create_tables(db_path: Path, *statements: str) -> None:
    """Run ``CREATE TABLE IF NOT EXISTS`` statements in one transaction: how each part of the node (approvals,
    preprocessing states, privacy state, secure aggregation) adds its tables to an existing ``node.db``."""
    with _connect(db_path) as conn, conn:
        conn.execute("BEGIN IMMEDIATE")
        for statement in statements:
            conn.execute(statement)


def create_schema(db_path: str | os.PathLike[str]) -> None:
    """Create the registry's tables in ``db_path`` (idempotent; the file is created if needed)."""
    path = Path(db_path)
    with _connect(path, create=True) as conn, conn:
        conn.execute("BEGIN IMMEDIATE")
        for statement in filter(str.strip, _SCHEMA.split(";")):  # executescript would commit
            conn.execute(statement)
        version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        _check_version(version, path)
        if version is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))


def _check_version(version: int | None, db_path: Path) -> None:
    if version is not None and version > SCHEMA_VERSION:
        raise FedlabConfigError(
            f"the dataset registry {db_path} has schema version {version}, newer than this fedlab "
            f"understands ({SCHEMA_VERSION}); upgrade fedlab"
        )


def _clean_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise FedlabDatasetError("the dataset name must not be empty: pass --name NAME")
    name = name.strip()
    if len(name) > MAX_NAME_LENGTH:
        raise FedlabDatasetError(
            f"the dataset name is {len(name)} characters long; at most {MAX_NAME_LENGTH} are allowed"
        )
    return name


def _clean_tags(tags: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tags, str) or not isinstance(tags, Sequence):
        raise FedlabDatasetError(f"tags must be a list of strings, not {type(tags).__name__}")
    cleaned: dict[str, None] = {}
    for tag in tags:
        if not isinstance(tag, str) or not tag.strip():
            raise FedlabDatasetError(f"every tag must be a non-empty string; got {tag!r}")
        tag = tag.strip()
        if "," in tag:
            raise FedlabDatasetError(f"tag {tag!r} contains a comma; pass tags as a comma-separated list")
        if len(tag) > MAX_TAG_LENGTH:
            raise FedlabDatasetError(f"tag {tag[:20]!r}... is longer than {MAX_TAG_LENGTH} characters")
        cleaned[tag] = None
    if not cleaned:
        raise FedlabDatasetError("a dataset needs at least one tag: pass --tags a,b")
    return tuple(cleaned)


class DatasetRegistry:
    """The datasets registered in one node database (``DIR/node.db``)."""

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.db_path = Path(db_path).expanduser().resolve()
        with _connect(self.db_path) as conn:
            try:
                version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
            except sqlite3.OperationalError:
                version = None
        if version is None:
            raise FedlabConfigError(f"{self.db_path} is not a fedlab dataset registry (no schema version)")
        _check_version(version, self.db_path)

    @property
    def _node_dir(self) -> Path:
        return self.db_path.parent

    def add(
        self,
        name: str,
        tags: Sequence[str],
        data_type: str,
        path: str | os.PathLike[str],
        description: str = "",
        lineage: Mapping[str, Any] | None = None,
    ) -> DatasetRecord:
        """Inspect the dataset at ``path`` and register it under ``name``; return its record.

        ``lineage`` (for a dataset made by preprocessing on this node): ``derived_from``, the
        source dataset's id, and ``steps``, the transforms that made it; kept in the metadata
        so that a researcher can tell a derived dataset from its source.
        """
        name = _clean_name(name)
        clean_tags = _clean_tags(tags)
        if data_type not in DATA_TYPES:
            raise FedlabDatasetError(
                f"unknown dataset type {data_type!r}; use one of {', '.join(DATA_TYPES)}"
            )
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_LENGTH:
            raise FedlabDatasetError(
                f"the description must be a string of at most {MAX_DESCRIPTION_LENGTH} characters"
            )
        metadata = inspect_csv(path) if data_type == "csv" else inspect_images(path)
        if lineage:
            metadata["derived_from"] = str(lineage.get("derived_from", ""))
            metadata["steps"] = [str(step) for step in lineage.get("steps", [])]
            # node-side only (never in to_info): where the rules of a derived dataset come from
            for key in ("root", "state_id"):
                if lineage.get(key):
                    metadata[key] = str(lineage[key])
        record = DatasetRecord(
            dataset_id="dataset-" + uuid.uuid4().hex[:12],
            name=name,
            tags=clean_tags,
            data_type=data_type,
            path=str(Path(path).expanduser().resolve()),
            description=description,
            metadata=metadata,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        duplicate = FedlabDatasetError(
            f"a dataset named {name!r} is already registered on this node; remove it first with "
            f"`fedlab node dataset remove {shlex.quote(str(self._node_dir))} {shlex.quote(name)}` "
            "or pick another name"
        )
        with _connect(self.db_path) as conn, conn:
            conn.execute("BEGIN IMMEDIATE")
            if conn.execute("SELECT 1 FROM datasets WHERE name = ?", (name,)).fetchone():
                raise duplicate
            try:
                conn.execute(
                    _INSERT,
                    (
                        record.dataset_id,
                        record.name,
                        json.dumps(list(record.tags)),
                        record.data_type,
                        record.path,
                        record.description,
                        json.dumps(record.metadata),
                        record.created_at,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                if "datasets.name" in str(exc):  # a concurrent add won the race for this name
                    raise duplicate from exc
                raise
        return record

    def list(self) -> RecordList:
        """Every registered dataset, ordered by name."""
        with _connect(self.db_path) as conn:
            rows = conn.execute(_SELECT_ALL).fetchall()
        return [DatasetRecord._from_row(row) for row in rows]

    def _find_row(self, conn: sqlite3.Connection, name_or_id: str) -> tuple[Any, ...]:
        row = conn.execute(_SELECT_ONE, (name_or_id, name_or_id, name_or_id)).fetchone()
        if row is not None:
            return tuple(row)
        names = [r[0] for r in conn.execute("SELECT name FROM datasets ORDER BY name")]
        available = f"registered datasets: {', '.join(names)}" if names else "no datasets are registered"
        raise FedlabDatasetError(
            f"no dataset named {name_or_id!r} on this node ({available}); "
            f"see `fedlab node dataset list {shlex.quote(str(self._node_dir))}`"
        )

    def get(self, name_or_id: str) -> DatasetRecord:
        """The dataset with this name or id; FedlabDatasetError naming the available ones if none."""
        with _connect(self.db_path) as conn:
            return DatasetRecord._from_row(self._find_row(conn, name_or_id))

    def remove(self, name_or_id: str) -> DatasetRecord:
        """Unregister a dataset (its files are left alone); return the record that was removed."""
        with _connect(self.db_path) as conn, conn:
            conn.execute("BEGIN IMMEDIATE")
            row = self._find_row(conn, name_or_id)
            conn.execute("DELETE FROM datasets WHERE dataset_id = ?", (row[0],))
        try:
            return DatasetRecord._from_row(row)
        except FedlabConfigError:  # a damaged entry can still be removed; its tags/metadata are lost
            return DatasetRecord(row[0], row[1], (), row[3], row[4], row[5], {}, row[7])

    def search(self, tags: Sequence[str]) -> RecordList:
        """Datasets carrying every one of ``tags`` (exact match after stripping spaces)."""
        wanted = set(_clean_tags(tags))
        return [record for record in self.list() if wanted.issubset(record.tags)]
