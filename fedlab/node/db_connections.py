"""Connections to ``node.db`` kept open per thread, so a request does not pay for opening the file.

Opening a SQLite connection to a WAL database (the file, its WAL and shared-memory index, the first
read of the schema) costs about half a millisecond; a training round on a node checks its plan's
approval and reads its dataset's record, two opens per round, as much CPU as the node's whole
handling of a small model's round besides. A thread now keeps its connections (at most
``PER_THREAD``, the least recently used closed first) and reuses them. What every fedlab store
relies on still holds:

- *Fresh reads.* The connection is in autocommit mode: every statement outside an explicit
  transaction starts its own read, so it sees what the command line committed a moment ago (an
  approval revoked, a dataset removed). A transaction a caller leaves open (an error between its
  ``BEGIN`` and its commit) is rolled back when its block ends, so it never reaches the next user.
- *The same file.* A connection is reused only while the path still names the file it opened (same
  device and inode): a node directory removed and made again, or a database restored from a copy,
  gets a new connection.
- *One user at a time.* A block that opens the same database again while its thread already holds
  it (nested use) gets a connection of its own, closed at the end, as before: the outer block's
  transaction is never committed or rolled back by the inner one.
- *No damage kept.* A block that ends in a SQLite error closes and forgets its connection.

Connections never cross threads (SQLite's default check stays on) or processes: the training
worker is a separate program, and a forked child would open its own (the parent's are left alone).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PER_THREAD", "close_all", "pooled_connection"]

PER_THREAD = 4  # a node uses one node.db; a test process may touch many, so the pool is bounded


@dataclass
class _Entry:
    conn: sqlite3.Connection
    file: tuple[int, int]  # (st_dev, st_ino) of the file it opened
    busy: bool = False


class _Pool(threading.local):
    def __init__(self) -> None:
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        self.pid = os.getpid()


_pool = _Pool()
_inherited: list[_Entry] = []  # a forked child's copies of its parent's connections: never used nor closed


def _entries() -> OrderedDict[str, _Entry]:
    """This thread's entries; in a forked child none of the parent's (SQLite forbids using them there)."""
    if _pool.pid != os.getpid():
        _inherited.extend(_pool.entries.values())
        _pool.entries, _pool.pid = OrderedDict(), os.getpid()
    return _pool.entries


def _file_of(db_path: Path) -> tuple[int, int]:
    try:
        st = os.stat(db_path)
    except OSError as exc:  # removed since the caller looked: as SQLite itself would say it
        raise sqlite3.OperationalError(f"unable to open database file ({exc.strerror})") from exc
    return st.st_dev, st.st_ino


def _open(db_path: Path, timeout: float) -> sqlite3.Connection:
    conn = sqlite3.connect(db_path, timeout=timeout, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    return conn


def _forget(key: str) -> None:
    entry = _entries().pop(key, None)
    if entry is not None:
        entry.conn.close()


@contextmanager
def pooled_connection(db_path: Path, timeout: float) -> Iterator[sqlite3.Connection]:
    """This thread's connection to ``db_path`` (autocommit mode, ``timeout`` seconds of busy wait),
    opened if it has none for that file or is already using it; sqlite errors propagate."""
    key = os.fspath(db_path)
    file = _file_of(db_path)
    entries = _entries()
    entry = entries.get(key)
    if entry is not None and not entry.busy and entry.file != file:
        _forget(key)  # the path names another file now
        entry = None
    if entry is not None and entry.busy:  # nested use: a connection of its own, as before pooling
        conn = _open(db_path, timeout)
        try:
            yield conn
        finally:
            conn.close()
        return
    if entry is None:
        entry = _Entry(_open(db_path, timeout), file)
        entries[key] = entry
        idle = [k for k, e in entries.items() if not e.busy and k != key]  # least recently used first
        for old in idle[:max(0, len(entries) - PER_THREAD)]:
            _forget(old)
    entries.move_to_end(key)
    entry.busy = True
    try:
        yield entry.conn
    except sqlite3.Error:
        entry.busy = False
        _forget(key)
        raise
    except BaseException:
        entry.busy = False
        if entry.conn.in_transaction:
            entry.conn.rollback()
        raise
    else:
        entry.busy = False
        if entry.conn.in_transaction:  # a BEGIN its block neither committed nor rolled back
            entry.conn.rollback()


def close_all() -> None:
    """Close this thread's pooled connections (tests; a thread that ends has its closed with it)."""
    entries = _entries()
    for key in list(entries):
        if not entries[key].busy:
            _forget(key)
