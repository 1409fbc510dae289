"""The run directory and service files a kernel finds the researcher service by."""

from __future__ import annotations

import os
import stat

import pytest

from fedlab.errors import FedlabConfigError
from fedlab.transport.service_files import (
    RUN_DIR_ENV,
    ServiceInfo,
    find_service,
    live_services,
    lock_service,
    run_dir,
    service_name,
    service_paths,
    write_service_info,
)


@pytest.fixture
def private(tmp_path, monkeypatch):
    path = tmp_path / "run"
    monkeypatch.setenv(RUN_DIR_ENV, str(path))
    return path


def info_for(address: str, endpoint: str = "ipc:///nowhere") -> ServiceInfo:
    return ServiceInfo(pid=os.getpid(), uid=os.getuid(), address=address, endpoint=endpoint, started=1.0,
                       researcher_id="researcher-x")


def test_the_run_directory_is_made_private_and_refused_when_open(private):
    assert run_dir() == private
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    private.chmod(0o750)
    with pytest.raises(FedlabConfigError, match="open to other users .*chmod 700"):
        run_dir()
    private.chmod(0o700)
    if os.geteuid() == 0:  # root can make a directory of another user to try
        os.chown(private, 65534, 65534)
        with pytest.raises(FedlabConfigError, match="belongs to user id 65534"):
            run_dir()


def test_xdg_runtime_dir_and_home_are_the_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    assert run_dir(create=False) == tmp_path / "xdg" / "fedlab"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert run_dir(create=False) == tmp_path / "home" / ".fedlab" / "run"


def test_one_name_per_port_whatever_the_interface():
    assert service_name("tcp://127.0.0.1:5555") == service_name("tcp://0.0.0.0:5555") == "tcp-5555"
    assert service_name("tcp://127.0.0.1:5556") == "tcp-5556"
    assert service_name("ipc:///tmp/x").startswith("addr-") and service_name("tcp://host") != "tcp-"


def test_a_socket_path_too_long_is_refused_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / ("x" * 120)))
    with pytest.raises(FedlabConfigError, match="longer than the 107 bytes.*FEDLAB_RUN_DIR"):
        service_paths("tcp://127.0.0.1:5555")


def test_a_held_lock_refuses_a_second_service_by_name_and_a_free_one_means_stale(private):
    address = "tcp://127.0.0.1:5555"
    paths = service_paths(address)
    lock = lock_service(paths)
    write_service_info(paths, info_for(address))
    assert stat.S_IMODE(paths.info.stat().st_mode) == 0o600
    with pytest.raises(FedlabConfigError, match=f"already runs for {address} \\(pid {os.getpid()}"):
        lock_service(paths)
    assert find_service("tcp://0.0.0.0:5555") == info_for(address)
    assert live_services() == [info_for(address)]
    lock.release()  # as the kernel releases it when a service dies
    paths.socket.write_text("")  # the dead service's socket file, too
    assert find_service(address) is None
    assert not paths.info.exists() and not paths.socket.exists() and paths.lock.exists()
    assert live_services() == []


def test_an_unreadable_service_file_is_not_trusted(private):
    address = "tcp://127.0.0.1:5557"
    paths = service_paths(address)
    lock = lock_service(paths)
    try:
        paths.info.write_text('{"pid": "not a number"}')
        assert find_service(address, settle=0.1) is None  # held but no usable file: not a service to attach to
        assert paths.info.exists()  # and not removed either: its holder is alive
    finally:
        lock.release()
