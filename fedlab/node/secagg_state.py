"""The node's secure aggregation sessions, kept in its SQLite database.

A session's private keys, self-mask seed, the shares it received and the steps it has taken
(shared, masked, unmasked) decide what the node may still reveal: masking twice under the same
masks, or answering the unmasking step for two different dropout sets, would undo the
protection. So the state lives in ``node.db``, not in memory, and each step is written in the
same transaction that decides it (``BEGIN IMMEDIATE``); the reply leaves only after the commit.
A restart resumes a session where it was; it never starts it again.

Sessions are keyed by the researcher who opened them (``peer``) and their id. Sessions older
than ``MAX_AGE_S`` are deleted when a new one starts, and a researcher may hold at most
``MAX_OPEN`` sessions at a time, so a stream of key requests cannot fill the node's disk.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedlab.errors import FedlabSecaggError
from fedlab.node.registry import _BUSY_TIMEOUT_S, _translate, create_tables
from fedlab.secagg.session import NodeSession

__all__ = ["MAX_AGE_S", "MAX_OPEN", "SecaggStore"]

MAX_AGE_S = 24 * 3600.0
MAX_OPEN = 256

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS secagg_sessions (peer TEXT NOT NULL, session_id TEXT NOT NULL,"
    " purpose TEXT NOT NULL, created REAL NOT NULL, state BLOB NOT NULL, PRIMARY KEY (peer, session_id))",
)


class SecaggStore:
    """The ``secagg_sessions`` table of one node database (created if missing)."""

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.db_path = Path(db_path).expanduser().resolve()
        create_tables(self.db_path, *_SCHEMA)
        # One connection, kept: a session's steps are a few ms each, and opening and closing a connection
        # per step was half of that. The lock makes one transaction at a time on it (steps of one node are
        # serialised by BEGIN IMMEDIATE anyway); other processes still see every commit.
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = sqlite3.connect(self.db_path, timeout=_BUSY_TIMEOUT_S, isolation_level=None,
                                                 check_same_thread=False)
                    self._conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
                conn = self._conn
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._conn = None  # a broken connection is not kept
                raise _translate(exc, self.db_path) from exc

    def create(self, peer: str, session: NodeSession, purpose: str) -> None:
        """Record a new session; an id that this researcher used before is refused (never new keys
        under an old session: shares of the old keys may already be out)."""
        now = time.time()
        with self._transaction() as conn:
            conn.execute("DELETE FROM secagg_sessions WHERE created < ?", (now - MAX_AGE_S,))
            if conn.execute("SELECT 1 FROM secagg_sessions WHERE peer = ? AND session_id = ?",
                            (peer, session.session_id)).fetchone() is not None:
                raise FedlabSecaggError(
                    f"secure aggregation session {session.session_id} was already started on this node; a session "
                    "runs once (start a new one with a new id)")
            (open_,) = conn.execute("SELECT COUNT(*) FROM secagg_sessions WHERE peer = ?", (peer,)).fetchone()
            if int(open_) >= MAX_OPEN:
                raise FedlabSecaggError(
                    f"this researcher already has {open_} secure aggregation sessions open on this node, the most it "
                    f"keeps; sessions are forgotten after {MAX_AGE_S / 3600:g} h. Retry later")
            conn.execute("INSERT INTO secagg_sessions (peer, session_id, purpose, created, state)"
                         " VALUES (?, ?, ?, ?, ?)", (peer, session.session_id, purpose, now, session.to_bytes()))

    @contextmanager
    def session(self, peer: str, session_id: str, purpose: str | None = None) -> Iterator[NodeSession]:
        """A transaction over one session (started for ``purpose``, or any when None): the block changes
        it, the change is saved when the block ends without an exception (and only then may its answer
        leave), rolled back otherwise."""
        with self._transaction() as conn:
            session = _load(conn, peer, session_id, purpose)
            yield session
            conn.execute("UPDATE secagg_sessions SET state = ? WHERE peer = ? AND session_id = ?",
                         (session.to_bytes(), peer, session_id))


def _load(conn: sqlite3.Connection, peer: str, session_id: str, purpose: str | None) -> NodeSession:
    row = conn.execute("SELECT purpose, state FROM secagg_sessions WHERE peer = ? AND session_id = ?",
                       (peer, session_id)).fetchone()
    if row is None:
        raise _unknown(session_id)
    if purpose is not None and row[0] != purpose:
        raise FedlabSecaggError(f"secure aggregation session {session_id} was started for {row[0]}, not {purpose}")
    return NodeSession.from_bytes(bytes(row[1]))


def _unknown(session_id: str) -> FedlabSecaggError:
    return FedlabSecaggError(f"no secure aggregation session {session_id} on this node (never started, or older "
                             f"than {MAX_AGE_S / 3600:g} h); start the round again")
