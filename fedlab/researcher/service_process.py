"""The researcher service as a process: ``fedlab researcher start``, ``status`` and ``stop``.

``run_service`` takes the address's service lock (a second service for the same port is
refused, naming the first), binds the nodes' socket with its key and allowlist
(:class:`ZmqResearcherTransport`), opens the local socket kernels attach to
(:class:`ServiceRelay`), writes the service file kernels find it by, and serves until SIGINT,
SIGTERM or ``fedlab researcher stop``; then it tells the kernels, says goodbye to the nodes
(they keep knocking, and come back to whoever binds the port next) and removes its files.
``start_detached`` runs it in the background and returns once it listens.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from fedlab import __version__
from fedlab.errors import FedlabConfigError, FedlabError, FedlabTransportError
from fedlab.protocol import DEFAULT_MAX_MESSAGE_BYTES
from fedlab.researcher.researcher import check_bulk, security
from fedlab.transport import ZmqResearcherTransport
from fedlab.transport.service_client import control
from fedlab.transport.service_files import (
    ServiceInfo,
    find_service,
    live_services,
    lock_service,
    remove_service_files,
    run_dir,
    service_paths,
    write_service_info,
)
from fedlab.transport.service_link import Bye, StatusQuery, StatusReply, StopRequest
from fedlab.transport.service_relay import ServiceRelay

__all__ = ["format_status", "run_service", "service_status", "start_detached", "stop_service"]

log = logging.getLogger("fedlab.service")
_STOP_WAIT_S = 15.0
INSECURE_WARNING = (
    "INSECURE: the researcher service at %s runs without a key: no encryption and no authentication, so any program "
    "that can reach this port can join as a node and anyone on the network can read the traffic. For local demos "
    "only; start it with --key and --allowlist (or set FEDLAB_KEY and FEDLAB_ALLOWLIST) for real data"
)


def _setup_logging(log_file: str | os.PathLike[str] | None) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s [researcher service] %(name)s: %(message)s")
    logger = logging.getLogger("fedlab")
    logger.setLevel(logging.INFO)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)


def run_service(address: str, *, key: str | os.PathLike[str] | None = None,
                allowlist: str | os.PathLike[str] | None = None, heartbeat_interval: float = 1.0,
                max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                log_file: str | os.PathLike[str] | None = None, bulk: bool | str | None = None) -> int:
    """Serve ``address`` to the nodes and to this user's kernels until stopped; return 0.

    ``bulk`` is the encrypted service's bulk path, as for ``Researcher(bulk=...)`` (None: ``$FEDLAB_BULK``,
    else on); every kernel attached works with it."""
    check_bulk(bulk)
    keypair, nodes_allowed = security(key, allowlist)
    paths = service_paths(address)
    lock = lock_service(paths)  # before anything binds: a second service is refused here, by name
    try:
        _setup_logging(log_file)
        transport = ZmqResearcherTransport(address, heartbeat_interval=heartbeat_interval,
                                           max_message_bytes=max_message_bytes, key=keypair, allowlist=nodes_allowed,
                                           bulk=bulk)
        relay = ServiceRelay(transport, paths.endpoint)
        try:
            relay.start()
        except FedlabTransportError as exc:
            raise FedlabTransportError(
                f"the researcher service cannot listen on {address} ({str(exc).split(': ', 1)[-1].split('.')[0]}): "
                "a researcher in a notebook kernel, or another program, may hold that port. Close it (its kernel's "
                "`researcher.close()`, or restart the kernel), or pass another --address") from None
        started = relay.started
        write_service_info(paths, ServiceInfo(
            pid=os.getpid(), uid=os.getuid(), address=address, endpoint=paths.endpoint, started=started,
            researcher_id=transport.researcher_id, public_key=keypair.public if keypair is not None else None,
            allowlist=str(nodes_allowed.path) if nodes_allowed is not None else None,
            log=str(Path(log_file).resolve()) if log_file is not None else None, version=__version__))
        print(f"researcher service for {address} listening (pid {os.getpid()}): notebooks of this user attach "
              f"with fedlab.Researcher({address!r}) or `%fed connect {address}`; Ctrl-C stops it", flush=True)
        if keypair is None:
            log.warning(INSECURE_WARNING, address)
        log.info("researcher service for %s started (pid %d); kernels of user id %d attach at %s; %s", address,
                 os.getpid(), os.getuid(), paths.endpoint,
                 "INSECURE, no encryption" if keypair is None else
                 f"encrypted, public key {keypair.public}, {len(nodes_allowed or ())} node key(s) allowed by "
                 f"{getattr(nodes_allowed, 'path', '')}")

        def on_signal(signum: int, frame: FrameType | None) -> None:
            relay.request_stop(f"it received {signal.Signals(signum).name}")

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not relay.stop_requested.wait(0.2):
            pass
        log.info("stopping: %s", relay.stop_reason)
        relay.stop()
        log.info("researcher service for %s stopped", address)
        return 0
    finally:
        remove_service_files(paths, only_stale=False)  # ours: the lock is still held
        lock.release()


def start_detached(address: str, argv: list[str], *, timeout: float = 60.0) -> tuple[ServiceInfo, Path]:
    """Run ``fedlab researcher start`` (``argv``, without ``--detach``) in its own session; return once it
    listens (its service file is written), with its log file. Raise with the log's end if it does not."""
    paths = service_paths(address)
    log_file = run_dir() / f"service-{paths.name}.log"
    if "--log" not in argv:
        argv = [*argv, "--log", str(log_file)]
    else:
        log_file = Path(argv[argv.index("--log") + 1])
    with open(run_dir() / f"service-{paths.name}.out", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedlab", *argv], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (run_dir() / f"service-{paths.name}.out").read_text(errors="replace").strip().splitlines()[-3:]
            raise FedlabError(f"the researcher service exited at start (code {proc.returncode}): "
                              + " ".join(tail))
        info = find_service(address, settle=0.0)
        if info is not None and info.pid == proc.pid:
            return info, log_file
        time.sleep(0.05)
    proc.terminate()
    raise FedlabError(f"the researcher service did not start listening within {timeout:g} s; see {log_file}")


def _targets(address: str | None) -> list[ServiceInfo]:
    if address is not None:
        info = find_service(address)
        return [info] if info is not None else []
    return live_services()


def service_status(address: str | None = None) -> list[StatusReply]:
    """The status of the service for ``address`` (of every live service of this user when None)."""
    replies = []
    for info in _targets(address):
        reply = control(info, StatusQuery())
        if not isinstance(reply, StatusReply):
            raise FedlabError(f"the researcher service for {info.address} (pid {info.pid}) answered "
                              f"{type(reply).__name__} to a status query: {getattr(reply, 'reason', '')}")
        replies.append(reply)
    return replies


def stop_service(address: str | None = None, *, timeout: float = _STOP_WAIT_S) -> ServiceInfo:
    """Stop the service for ``address`` (the only one running when None); return what it was."""
    targets = _targets(address)
    if not targets:
        where = f"for {address}" if address else "for you on this machine"
        raise FedlabConfigError(f"no researcher service runs {where}; nothing to stop")
    if len(targets) > 1:
        raise FedlabConfigError("several researcher services run: "
                                + ", ".join(f"{i.address} (pid {i.pid})" for i in targets)
                                + "; say which with --address")
    info = targets[0]
    try:
        reply = control(info, StopRequest())
    except FedlabError:
        reply = None
    if not isinstance(reply, Bye):
        os.kill(info.pid, signal.SIGTERM)  # it holds the lock of this user's run directory: it is ours
    deadline = time.monotonic() + timeout
    while find_service(info.address, settle=0.0) is not None:
        if time.monotonic() > deadline:
            raise FedlabError(f"the researcher service for {info.address} (pid {info.pid}) did not stop within "
                              f"{timeout:g} s; `kill {info.pid}` stops it")
        time.sleep(0.05)
    return info


def _ago(then: float) -> str:
    seconds = max(0.0, time.time() - then)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def format_status(reply: StatusReply) -> list[str]:
    """The lines `fedlab researcher status` prints for one service."""
    security_line = f"encrypted, public key {reply.public_key}" if reply.public_key else "INSECURE (no key)"
    lines = [f"researcher service for {reply.address}: pid {reply.pid}, started {_ago(reply.started)}, "
             f"{security_line}"]
    lines.append(f"  kernels attached: {len(reply.kernels)}")
    for k in reply.kernels:
        lines.append(f"    {k.kernel_id}  pid {k.pid}  {k.label or '-'}  attached {_ago(k.attached_at)}  "
                     f"researcher id {k.researcher_id}  requests in flight: {len(k.in_flight)}")
    online = sum(n.status != "offline" for n in reply.nodes)
    lines.append(f"  nodes: {len(reply.nodes)} known, {online} online or busy")
    for n in reply.nodes:
        lines.append(f"    {n.name}  {n.node_id}  {n.status}  last seen {_ago(n.last_seen)}")
    jobs = [(k, r) for k in reply.kernels for r in k.in_flight]
    lines.append(f"  requests in flight: {len(jobs)}")
    names = {n.node_id: n.name for n in reply.nodes}
    for k, r in jobs:
        lines.append(f"    {k.kernel_id} ({k.label or 'pid ' + str(k.pid)}): {r.msg_type} to "
                     f"{names.get(r.node_id, r.node_id)}, sent {_ago(r.sent_at)}")
    if reply.discarded:
        lines.append(f"  node messages discarded (for no request, or for a kernel that had gone): {reply.discarded}")
    return lines
