"""The state that protects a node's data across requests, kept in its SQLite database.

Disclosure rules that hold for one request only can be undone by the next one, so the node
remembers, per researcher (``peer``: the researcher's public key, or ``insecure`` for a node
without keys, where anyone can claim any id) and per *source* column of a source dataset
version (``source``: dataset id and a digest of its content), every cut rank it answered and
every threshold point it was asked (see :mod:`fedlab.privacy.cuts`). It also holds the node's
secret, from which fixed noise is drawn. Nothing here lives only in memory: a restart resets
nothing. An answer and the state it spends are written in one transaction (``BEGIN
IMMEDIATE``, which also serialises concurrent requests on the node), and the answer is sent
only after that transaction committed.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedlab.node.registry import _connect
from fedlab.privacy.cuts import CutState

__all__ = ["CutSession", "PrivacyState"]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS node_secret (id INTEGER PRIMARY KEY CHECK (id = 1), secret BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS cut_ranks (peer TEXT NOT NULL, source TEXT NOT NULL, col TEXT NOT NULL,"
    " rank INTEGER NOT NULL, PRIMARY KEY (peer, source, col, rank))",
    "CREATE TABLE IF NOT EXISTS cut_points (peer TEXT NOT NULL, source TEXT NOT NULL, col TEXT NOT NULL,"
    " point TEXT NOT NULL, PRIMARY KEY (peer, source, col, point))",
)


class CutSession:
    """One transaction's view of the cut state of one researcher on one source."""

    def __init__(self, conn: sqlite3.Connection, peer: str, source: str) -> None:
        self._conn, self._peer, self._source = conn, peer, source

    def load(self, column: str, allowance: int) -> CutState:
        key = (self._peer, self._source, column)
        ranks = {int(r) for (r,) in self._conn.execute(
            "SELECT rank FROM cut_ranks WHERE peer = ? AND source = ? AND col = ?", key)}
        points = {str(p) for (p,) in self._conn.execute(
            "SELECT point FROM cut_points WHERE peer = ? AND source = ? AND col = ?", key)}
        return CutState(ranks=ranks, points=points, remaining=max(0, allowance - len(points)))

    def save(self, column: str, state: CutState) -> None:
        key = (self._peer, self._source, column)
        self._conn.executemany("INSERT OR IGNORE INTO cut_ranks (peer, source, col, rank) VALUES (?, ?, ?, ?)",
                               [(*key, r) for r in sorted(state.new_ranks)])
        self._conn.executemany("INSERT OR IGNORE INTO cut_points (peer, source, col, point) VALUES (?, ?, ?, ?)",
                               [(*key, p) for p in sorted(state.new_points)])
        state.new_ranks.clear()
        state.new_points.clear()

    def remaining(self, column: str, allowance: int) -> int:
        (used,) = self._conn.execute("SELECT COUNT(*) FROM cut_points WHERE peer = ? AND source = ? AND col = ?",
                                     (self._peer, self._source, column)).fetchone()
        return max(0, allowance - int(used))


class PrivacyState:
    """The privacy tables of one node database (``DIR/node.db``), created if missing."""

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.db_path = Path(db_path).expanduser().resolve()
        with _connect(self.db_path) as conn, conn:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            if conn.execute("SELECT 1 FROM node_secret").fetchone() is None:
                conn.execute("INSERT INTO node_secret (id, secret) VALUES (1, ?)", (secrets.token_bytes(32),))
            (secret,) = conn.execute("SELECT secret FROM node_secret").fetchone()
        self.secret = bytes(secret)

    @contextmanager
    def cuts(self, peer: str, source: str) -> Iterator[CutSession]:
        """A transaction over the cut state of ``peer`` on ``source``: committed when the block ends
        without an exception, rolled back otherwise."""
        with _connect(self.db_path) as conn, conn:
            conn.execute("BEGIN IMMEDIATE")
            yield CutSession(conn, peer, source)
