"""Where the kernels of one user find the researcher service of an address: the run directory.

A researcher service (``fedlab researcher start``) holds the socket the nodes dial, and lets
the notebook kernels of the same user on the same machine attach to it through a local socket.
Everything a kernel needs to find it lies in one directory, private to the user:

* ``$FEDLAB_RUN_DIR``, else ``$XDG_RUNTIME_DIR/fedlab``, else ``~/.fedlab/run``; created with
  mode 0700 and refused when it belongs to another user or is open to group or others, since
  whoever can enter it can attach to the service (and so ask the nodes).
* per service, under a name made from its address (``tcp-5555`` for any TCP address on port
  5555, so that ``tcp://0.0.0.0:5555`` and ``tcp://127.0.0.1:5555`` meet; a hash otherwise):
  ``service-NAME.lock``, locked (``flock``) by the service for as long as it lives;
  ``service-NAME.json``, its pid, local endpoint, address and public key, written once it
  listens; ``service-NAME.sock``, the local (zmq ``ipc://``) socket, mode 0600.

The lock, not the file, says whether a service lives: the kernel releases it when the process
dies however it dies, so a service file whose lock can be taken was left by a dead service; it
is removed (with its socket) by whoever finds it. The lock file itself is never removed (see
``fedlab.node.dir_lock`` for why deleting a lock file lets two holders in).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import msgspec

from fedlab.errors import FedlabConfigError

__all__ = ["RUN_DIR_ENV", "ServiceInfo", "ServiceLock", "find_service", "live_services", "lock_service",
           "remove_service_files", "run_dir", "service_name", "service_paths", "write_service_info"]

log = logging.getLogger("fedlab.service")
RUN_DIR_ENV = "FEDLAB_RUN_DIR"
_SUN_PATH_MAX = 107  # bytes of a unix socket path (sockaddr_un.sun_path, less its NUL) on Linux
_SETTLE_S = 2.0  # a service that holds its lock writes its file within this (it only binds in between)
_RETRY_S = 0.02


class ServiceInfo(msgspec.Struct, frozen=True):
    """What a running service says of itself in its service file."""

    pid: int
    uid: int
    address: str
    endpoint: str
    started: float
    researcher_id: str
    public_key: str | None = None
    allowlist: str | None = None
    log: str | None = None
    version: str = ""


class ServicePaths(msgspec.Struct, frozen=True):
    name: str
    lock: Path
    info: Path
    socket: Path

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.socket}"


def run_dir(*, create: bool = True) -> Path:
    """The user's run directory (see the module docstring), made 0700 if ``create``; raise if unsafe."""
    configured = os.environ.get(RUN_DIR_ENV)
    if configured:
        path = Path(configured).expanduser()
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "fedlab"
    else:
        path = Path.home() / ".fedlab" / "run"
    if create:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise FedlabConfigError(f"cannot create the fedlab run directory {path}: {exc.strerror or exc}; set "
                                    f"${RUN_DIR_ENV} to a directory of yours") from None
    check_private(path)
    return path


def check_private(path: Path) -> None:
    """Raise unless ``path`` (if it exists) is a directory of this user that no one else may enter."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        raise FedlabConfigError(f"the fedlab run directory {path} is not a directory; remove it or set ${RUN_DIR_ENV}")
    if info.st_uid != os.getuid():
        raise FedlabConfigError(
            f"the fedlab run directory {path} belongs to user id {info.st_uid}, not to you ({os.getuid()}): "
            f"whoever owns it could pose as your researcher service. Set ${RUN_DIR_ENV} to a directory of yours")
    if info.st_mode & 0o077:
        raise FedlabConfigError(
            f"the fedlab run directory {path} is open to other users (mode {stat.S_IMODE(info.st_mode):o}): they "
            f"could attach to your researcher service. Run `chmod 700 {path}` (or set ${RUN_DIR_ENV})")


def service_name(address: str) -> str:
    """The name of the service files of ``address``: ``tcp-PORT`` for TCP, a hash of the address otherwise."""
    parsed = urlparse(address)
    if parsed.scheme == "tcp":
        try:
            port = parsed.port
        except ValueError:
            port = None
        if port is not None:
            return f"tcp-{port}"
    return "addr-" + hashlib.sha256(address.encode()).hexdigest()[:16]


def service_paths(address: str, directory: Path | None = None) -> ServicePaths:
    directory = run_dir() if directory is None else directory
    name = service_name(address)
    paths = ServicePaths(name, directory / f"service-{name}.lock", directory / f"service-{name}.json",
                         directory / f"service-{name}.sock")
    if len(os.fsencode(str(paths.socket))) > _SUN_PATH_MAX:
        raise FedlabConfigError(f"the researcher service's local socket {paths.socket} would be longer than the "
                                f"{_SUN_PATH_MAX} bytes a socket path may have; set ${RUN_DIR_ENV} to a shorter "
                                "directory")
    return paths


class ServiceLock:
    """The lock a service holds on its lock file while it lives (released at exit, or by the kernel at death)."""

    def __init__(self, paths: ServicePaths, fd: int) -> None:
        self.paths = paths
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def lock_service(paths: ServicePaths) -> ServiceLock:
    """Take the service lock of ``paths`` or raise, naming the service that holds it. Stale files are removed."""
    fd = _open_lock(paths)
    deadline = time.monotonic() + _SETTLE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            pass
        info = read_service_info(paths)
        if info is not None or time.monotonic() > deadline:
            os.close(fd)
            raise FedlabConfigError(_taken(paths, info))
        time.sleep(_RETRY_S)  # a service is starting (or a kernel is checking the lock for a moment)
    remove_service_files(paths, only_stale=False)  # ours now: what lies there is a dead service's
    return ServiceLock(paths, fd)


def _taken(paths: ServicePaths, info: ServiceInfo | None) -> str:
    if info is None:
        return (f"a researcher service for {paths.name.replace('-', ' port ', 1)} is starting or stuck before it "
                f"wrote {paths.info} (`fuser -v {paths.lock}` shows it); wait a moment, or stop it")
    return (f"a researcher service already runs for {info.address} (pid {info.pid}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.started))}); its kernels and nodes stay "
            "with it. `fedlab researcher status` shows it, `fedlab researcher stop --address "
            f"{info.address}` stops it; or start this one on another port")


def _open_lock(paths: ServicePaths) -> int:
    try:
        return os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise FedlabConfigError(f"cannot open the researcher service's lock file {paths.lock}: "
                                f"{exc.strerror or exc}") from None


def write_service_info(paths: ServicePaths, info: ServiceInfo) -> None:
    """Write the service file at once and whole (a temporary file renamed over it), mode 0600."""
    tmp = paths.info.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(msgspec.json.encode(info))
    os.replace(tmp, paths.info)


def read_service_info(paths: ServicePaths) -> ServiceInfo | None:
    """The service file's content, or None when it is missing or unreadable (never trusted beyond parsing)."""
    try:
        data = paths.info.read_bytes()
    except OSError:
        return None
    try:
        return msgspec.json.decode(data, type=ServiceInfo)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


@contextlib.contextmanager
def _probe(paths: ServicePaths) -> Iterator[bool]:
    """Whether a live service holds the lock of ``paths``: True, or False while this holds a shared lock."""
    try:
        fd = os.open(paths.lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        yield False  # no lock file: no service ever started here
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            yield True
            return
        yield False
    finally:
        os.close(fd)


def remove_service_files(paths: ServicePaths, *, only_stale: bool = True) -> None:
    """Remove the service file and the socket of ``paths`` (with ``only_stale``: unless a live service holds them)."""
    with _probe(paths) if only_stale else contextlib.nullcontext(False) as alive:
        if alive:
            return
        for path in (paths.info, paths.socket):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def find_service(address: str, *, directory: Path | None = None, settle: float = _SETTLE_S) -> ServiceInfo | None:
    """The live service for ``address``'s port (or address), or None. A dead service's files are removed.

    A service that holds its lock but has not written its file yet (it is binding) is waited
    for, up to ``settle`` seconds.
    """
    paths = service_paths(address, directory)
    deadline = time.monotonic() + settle
    while True:
        with _probe(paths) as alive:
            info = read_service_info(paths)
            if not alive:
                if info is not None:
                    log.warning("removed the service file %s: the researcher service it names (pid %d, %s) is no "
                                "longer running", paths.info, info.pid, info.address)
                for path in (paths.info, paths.socket):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                return None
        if info is not None:
            if info.uid != os.getuid():
                raise FedlabConfigError(f"the service file {paths.info} names user id {info.uid}, not you; remove it")
            return info
        if time.monotonic() > deadline:
            return None
        time.sleep(_RETRY_S)


def live_services(directory: Path | None = None) -> list[ServiceInfo]:
    """Every live service in the run directory (stale files found on the way are removed)."""
    directory = run_dir() if directory is None else directory
    found = []
    for lock in sorted(directory.glob("service-*.lock")):
        name = lock.name[len("service-"):-len(".lock")]
        paths = ServicePaths(name, lock, lock.with_suffix(".json"), lock.with_suffix(".sock"))
        with _probe(paths) as alive:
            info = read_service_info(paths)
        if alive and info is not None:
            found.append(info)
        elif not alive:
            remove_service_files(paths)
    return found
