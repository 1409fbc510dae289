"""Per-thread reuse of node.db connections: fresh reads, the same file, nested use, no kept damage."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from fedlab.node import db_connections
from fedlab.node.db_connections import pooled_connection


@pytest.fixture(autouse=True)
def _clean_pool():
    db_connections.close_all()
    yield
    db_connections.close_all()


def _make(path: Path, value: str) -> Path:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (v TEXT)")
    conn.execute("INSERT INTO t VALUES (?)", (value,))
    conn.close()
    return path


def _read(path: Path) -> list[str]:
    with pooled_connection(path, 5.0) as conn:
        return [r[0] for r in conn.execute("SELECT v FROM t ORDER BY v")]


def test_a_thread_reuses_its_connection_and_sees_other_writers_at_once(tmp_path) -> None:
    db = _make(tmp_path / "node.db", "a")
    with pooled_connection(db, 5.0) as first:
        pass
    other = sqlite3.connect(db, isolation_level=None)  # the command line, another process in real life
    other.execute("INSERT INTO t VALUES ('b')")
    with pooled_connection(db, 5.0) as second:
        assert second is first
        assert [r[0] for r in second.execute("SELECT v FROM t ORDER BY v")] == ["a", "b"]
    other.execute("DELETE FROM t WHERE v = 'a'")  # a revocation is seen by the very next read
    assert _read(db) == ["b"]
    other.close()


def test_threads_do_not_share_connections(tmp_path) -> None:
    db = _make(tmp_path / "node.db", "a")
    with pooled_connection(db, 5.0) as mine:
        pass
    seen: list[sqlite3.Connection] = []

    def use() -> None:
        with pooled_connection(db, 5.0) as conn:
            seen.append(conn)
            conn.execute("SELECT 1").fetchone()

    thread = threading.Thread(target=use)
    thread.start()
    thread.join(10)
    assert seen and seen[0] is not mine


def test_a_file_made_again_at_the_same_path_gets_a_new_connection(tmp_path) -> None:
    db = _make(tmp_path / "node.db", "old")
    assert _read(db) == ["old"]
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    _make(db, "new")
    assert _read(db) == ["new"]
    restored = _make(tmp_path / "copy.db", "restored")
    shutil.move(restored, db)  # a backup put back in place: another inode
    assert _read(db) == ["restored"]


def test_nested_use_gets_its_own_connection_and_leaves_the_outer_transaction_alone(tmp_path) -> None:
    db = _make(tmp_path / "node.db", "a")
    with pooled_connection(db, 5.0) as outer:
        outer.execute("BEGIN IMMEDIATE")
        outer.execute("INSERT INTO t VALUES ('b')")
        with pooled_connection(db, 0.1) as inner:
            assert inner is not outer
            assert [r[0] for r in inner.execute("SELECT v FROM t")] == ["a"]  # not yet committed
        assert outer.in_transaction
        outer.execute("COMMIT")
    assert _read(db) == ["a", "b"]


def test_a_transaction_left_open_is_rolled_back_and_an_error_drops_the_connection(tmp_path) -> None:
    db = _make(tmp_path / "node.db", "a")
    with pooled_connection(db, 5.0) as conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES ('half')")
    assert not conn.in_transaction
    assert _read(db) == ["a"]
    with pytest.raises(sqlite3.OperationalError), pooled_connection(db, 5.0) as broken:
        broken.execute("SELECT * FROM no_such_table")
    with pooled_connection(db, 5.0) as fresh:
        assert fresh is not broken
    with pytest.raises(sqlite3.ProgrammingError):
        broken.execute("SELECT 1")  # closed


def test_a_thread_keeps_at_most_a_few_connections(tmp_path) -> None:
    paths = [_make(tmp_path / f"n{i}.db", str(i)) for i in range(db_connections.PER_THREAD + 3)]
    conns = []
    for path in paths:
        with pooled_connection(path, 5.0) as conn:
            conns.append(conn)
    open_ones = 0
    for conn in conns:
        try:
            conn.execute("SELECT 1")
            open_ones += 1
        except sqlite3.ProgrammingError:
            pass
    assert open_ones == db_connections.PER_THREAD
    assert _read(paths[0]) == ["0"]  # an evicted one opens again


def test_a_file_that_is_gone_is_an_error_sqlite_would_give(tmp_path) -> None:
    db = _make(tmp_path / "node.db", "a")
    assert _read(db) == ["a"]
    db.unlink()
    with pytest.raises(sqlite3.OperationalError, match="unable to open database file"):
        _read(db)


def test_a_forked_child_opens_its_own_connection(tmp_path) -> None:
    import os

    db = _make(tmp_path / "node.db", "a")
    with pooled_connection(db, 5.0) as parents:
        pass
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a fresh connection, and the right rows
        try:
            with pooled_connection(db, 5.0) as conn:
                ok = conn is not parents and [r[0] for r in conn.execute("SELECT v FROM t")] == ["a"]
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    assert answer == b"1"
    with pooled_connection(db, 5.0) as again:
        assert again is parents  # the parent's own is untouched
