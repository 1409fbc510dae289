"""One process per node directory: the flock on ``DIR/node.lock``, its refusal and its release."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fedlab import cli
from fedlab.errors import FedlabConfigError
from fedlab.node import dir_lock
from fedlab.node.config import init_node_dir
from fedlab.node.dir_lock import LOCK_FILE, lock_node_dir

# A second process that tries the lock and reports the outcome: exit 0 if it got it, 2 with the message if not.
TRY_LOCK = """
import sys
from fedlab.errors import FedlabError
from fedlab.node.dir_lock import lock_node_dir
try:
    lock_node_dir(sys.argv[1])
except FedlabError as exc:
    print(exc)
    sys.exit(2)
print("locked")
"""
# A holder that takes the lock, says so, then waits to be killed.
HOLD_LOCK = """
import sys, time
from fedlab.node.dir_lock import lock_node_dir
lock = lock_node_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def try_lock_elsewhere(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", TRY_LOCK, str(directory)], capture_output=True, text=True,
                          timeout=60, check=False)


def raw_hold(directory: Path, content: bytes) -> int:
    """Hold the lock as a foreign holder would, with ``content`` in the file; return the descriptor."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.pwrite(fd, content, 0)
    return fd


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    with lock_node_dir(tmp_path) as lock:
        assert lock.held and lock.path == tmp_path / LOCK_FILE
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] and record["started"].endswith("Z")
        done = try_lock_elsewhere(tmp_path)
    assert done.returncode == 2, done.stderr
    message = done.stdout.strip()
    assert f"PID {os.getpid()}," in message and f"`kill {os.getpid()}`" in message
    assert str(tmp_path) in message and "only one process may serve a node directory" in message
    assert "Traceback" not in done.stderr


def test_the_same_process_cannot_take_it_twice_and_release_frees_it(tmp_path):
    lock = lock_node_dir(tmp_path)
    with pytest.raises(FedlabConfigError, match=f"PID {os.getpid()}"):
        lock_node_dir(tmp_path)
    lock.release()
    lock.release()  # twice is harmless
    assert not lock.held
    assert (tmp_path / LOCK_FILE).exists(), "the lock file is never deleted"
    assert (tmp_path / LOCK_FILE).read_text() == "", "a released lock names no process"
    assert try_lock_elsewhere(tmp_path).stdout.strip() == "locked"
    with lock_node_dir(tmp_path):
        pass


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(holder.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        assert line == ["locked\n"], f"the holder did not take the lock within 60 s: {line}"
        with pytest.raises(FedlabConfigError, match=f"PID {holder.pid},") as refused:
            lock_node_dir(tmp_path)
        assert f"`kill {holder.pid}`" in str(refused.value)
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(30)
        holder.stdout.close()
    assert holder.returncode == -signal.SIGKILL
    # No clean-up ran, the file still names the dead holder, and the lock is free all the same.
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    with lock_node_dir(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("content", [b"", b"\x00\xffgarbage", b"not json\n", b'{"pid": "12"}', b"[1, 2]",
                                     b'{"pid": -5}', b'{"pid": true}'])
def test_a_holder_that_wrote_no_usable_pid_is_refused_without_one(tmp_path, monkeypatch, content):
    monkeypatch.setattr(dir_lock, "_SETTLE_S", 0.2)
    fd = raw_hold(tmp_path, content)
    try:
        with pytest.raises(FedlabConfigError) as refused:
            lock_node_dir(tmp_path)
    finally:
        os.close(fd)
    message = str(refused.value)
    assert "already in use by another fedlab node process" in message and "has not written its PID" in message
    assert f"fuser -v {tmp_path / LOCK_FILE}" in message and "PID -" not in message and "kill" not in message


def test_a_dead_pid_left_in_the_file_is_not_named(tmp_path, monkeypatch):
    monkeypatch.setattr(dir_lock, "_SETTLE_S", 0.2)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=60, check=True)
    dead = int(gone.stdout)
    fd = raw_hold(tmp_path, json.dumps({"pid": dead, "host": os.uname().nodename}).encode())
    try:
        with pytest.raises(FedlabConfigError, match="has not written its PID") as refused:
            lock_node_dir(tmp_path)
    finally:
        os.close(fd)
    assert f"PID {dead}" not in str(refused.value)


def test_a_holder_still_writing_its_pid_is_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr(dir_lock, "_SETTLE_S", 60.0)  # ends as soon as the PID is there: no tight timing
    fd = raw_hold(tmp_path, b"")
    writer = threading.Timer(0.1, lambda: os.pwrite(fd, json.dumps({"pid": os.getpid()}).encode(), 0))
    writer.start()
    try:
        with pytest.raises(FedlabConfigError, match=f"PID {os.getpid()}\\)"):
            lock_node_dir(tmp_path)
    finally:
        writer.join(60)
        os.close(fd)


def test_a_holder_on_another_host_is_named_with_its_host(tmp_path):
    fd = raw_hold(tmp_path, json.dumps({"pid": 4242, "host": "other-host.example", "started": "X"}).encode())
    try:
        with pytest.raises(FedlabConfigError) as refused:
            lock_node_dir(tmp_path)
    finally:
        os.close(fd)
    assert "(PID 4242 on host other-host.example, started X)" in str(refused.value)
    assert "(`kill 4242` on host other-host.example)" in str(refused.value)


def test_a_lock_file_that_cannot_be_opened_says_so(tmp_path):
    with pytest.raises(FedlabConfigError, match="cannot open the node's lock file"):
        lock_node_dir(tmp_path / "missing")


def test_node_start_on_a_locked_directory_exits_2_with_one_line(tmp_path, capsys):
    config = init_node_dir(tmp_path / "site-a", "site-a")
    with lock_node_dir(config.directory):
        assert cli.main(["node", "start", str(config.directory)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedlab: error: node directory ")
    assert f"PID {os.getpid()}," in err and "Traceback" not in err
    assert not (config.directory / "node.log").exists() and not (config.directory / "audit.log").exists()
