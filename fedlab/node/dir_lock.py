"""One process per node directory: the lock `fedlab node start` holds on ``DIR/node.lock``.

Two processes serving one node directory would announce the same node id, write one
``node.db`` and one ``audit.log`` (whose hash chain they would break between them) and both
dial the researcher, which sees one node flapping between two sessions. So ``run_node`` takes an
exclusive, non-blocking ``flock`` on ``DIR/node.lock`` before it touches anything else, and a
second process is refused at once with a message naming the PID that holds the lock.

The lock lives on an open file descriptor that the process keeps for its whole life, so the
kernel releases it when the process dies, however it dies (SIGKILL and the OOM killer included):
a dead node never leaves a stale lock behind and nothing has to be cleaned up by hand. The file
itself carries the holder's PID, host and start time, only so that the refusal can name them;
the lock, not the text, is what counts. The file is never deleted: a process that deleted it
while a second one waited to open it would let a third create and lock a new file under the same
name while the second locked the old one, and two processes would run again.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

from fedlab.errors import FedlabConfigError

__all__ = ["LOCK_FILE", "NodeDirLock", "lock_node_dir"]

LOCK_FILE = "node.lock"
# The holder writes its PID just after it takes the lock; a refusal that reads the file in
# between, or reads what a killed holder left, looks again for this long before it gives up.
_SETTLE_S = 1.0
_RETRY_S = 0.05


class NodeDirLock:
    """The exclusive lock on one node directory; it is held until :meth:`release` or process death."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Clear the file and release the lock (the file stays: see the module docstring)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # the file names no process once none holds it
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> NodeDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_node_dir(directory: str | os.PathLike[str]) -> NodeDirLock:
    """Take the lock on node ``directory`` or raise FedlabConfigError naming the process that holds it."""
    path = Path(directory) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise FedlabConfigError(f"cannot open the node's lock file {path}: {exc.strerror or exc}") from exc
    try:
        holder = _take(fd, path)
        if holder is not None:
            raise FedlabConfigError(_refusal(Path(directory), path, holder))
        try:
            _write_holder(fd)
        except OSError:
            pass  # a full disk: the lock is held all the same, and a refusal then names no PID
    except BaseException:
        os.close(fd)
        raise
    return NodeDirLock(path, fd)


def _take(fd: int, path: Path) -> dict[str, object] | None:
    """Lock ``fd``; None once it is ours, else what the holder wrote (``{}`` if it never says)."""
    deadline = time.monotonic() + _SETTLE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            pass
        except OSError as exc:
            raise FedlabConfigError(
                f"cannot lock {path} ({exc.strerror or exc}): the file system of this node directory does not "
                "support file locks, so fedlab cannot make sure only one process serves it; move the node "
                "directory to a local disk"
            ) from exc
        holder = _read_holder(fd)
        if _plausible(holder):
            return holder
        if time.monotonic() > deadline:
            return {}  # a holder that never wrote its PID, or left a dead one's: name none rather than a wrong one
        time.sleep(_RETRY_S)  # the holder is still writing its PID, or is gone and the lock about to be free


def _write_holder(fd: int) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)  # one write straight to the kernel: other processes see it at once


def _read_holder(fd: int) -> dict[str, object]:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return {}
    return {"pid": pid, "host": str(record.get("host", "")), "started": str(record.get("started", ""))}


def _plausible(holder: dict[str, object]) -> bool:
    """Whether ``holder`` names a process that may hold the lock (not a dead one a killed holder left)."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    if holder.get("host") not in ("", socket.gethostname()):
        return True  # another machine's process: nothing here can check it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, under another user
    return True


def _refusal(directory: Path, path: Path, holder: dict[str, object]) -> str:
    rule = "only one process may serve a node directory at a time"
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return (f"node directory {directory} is already in use by another fedlab node process, which holds "
                f"{path} but has not written its PID there (`fuser -v {path}` shows it): {rule}. Stop that "
                "process first, or start another node directory")
    host = str(holder.get("host") or "")
    elsewhere = host not in ("", socket.gethostname())
    where = f" on host {host}" if elsewhere else ""
    started = f", started {holder['started']}" if holder.get("started") else ""
    return (f"node directory {directory} is already in use by another fedlab node process (PID {pid}{where}"
            f"{started}): {rule}. Stop that process first (`kill {pid}`{where}), or start another node directory")
