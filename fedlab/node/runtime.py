"""Running a node: `fedlab node start DIR`.

The transport's thread receives; work runs on a small thread pool so the message loop, and
with it the heartbeats, never waits for a handler. Training requests run one at a time on
their own long-lived thread (``fedlab-train``), so a round that takes minutes never holds up
a ping, an analytics request or the cancel that stops it. That thread hands each round to the
node's training worker process (``fedlab.node.plan_worker``), which is started, and imports
torch, once, at the first training message (an approval or status request, usually, so that
the first round is already warm); a node that never trains never starts it. The main thread
only waits for SIGINT/SIGTERM and then shuts down within a second or two (a running training
is cancelled first).

Analytics and preprocessing requests are capped: at most ``disclosure.max_concurrent`` of them
are queued or running at once, and one that arrives beyond that is answered ``busy`` at once,
from the io thread, instead of piling up behind the others (a researcher, or a hostile peer,
cannot queue unbounded work on the node).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType

from fedlab.analytics.disclosure_rules import describe
from fedlab.errors import FedlabConfigError, FedlabProtocolError
from fedlab.node.analytics_handler import INSECURE_PEER
from fedlab.node.audit import AUDIT_FILE, AuditLog
from fedlab.node.config import NodeConfig, load_config
from fedlab.node.dispatch import Dispatcher
from fedlab.node.registry import DatasetRegistry
from fedlab.protocol import DecodeError, Envelope, ErrorReply, make_envelope
from fedlab.transport import ZmqNodeTransport
from fedlab.transport.keys import KeyPair, load_keypair

__all__ = ["Node", "run_node"]

log = logging.getLogger("fedlab.node")
_WARM_UP_PAUSE_S = 30.0
_TRAINING_MESSAGES = frozenset({"training_plan_approve_request", "training_plan_status_request", "train_request"})
_CAPPED_MESSAGES = frozenset({"fa_request", "preproc_request"})  # at most disclosure.max_concurrent in flight
INSECURE_WARNING = (
    "INSECURE: this node talks to the researcher with no encryption or authentication: anyone on the network "
    "can read what it sends and pose as the researcher. For local demos only; for real data create the node "
    "with `fedlab node init DIR --name NAME --researcher-key FILE`"
)


def node_keys(config: NodeConfig) -> KeyPair | None:
    """The node's own key pair, or None for an insecure node; a config with neither is refused."""
    if config.insecure:
        return None
    if not config.researcher_public_key:
        raise FedlabConfigError(
            f"{config.config_path} has no researcher_public_key, so this node cannot know whom it may talk to: "
            "create the node with `fedlab node init DIR --name NAME --researcher-key FILE`, or for a local demo "
            "only add `insecure = true` to config.toml"
        )
    if not config.secret_key_path.is_file():
        raise FedlabConfigError(
            f"{config.secret_key_path} is missing: this node's secret key is gone. Restore it, or create the "
            "node again with `fedlab node init` (its new public key must then go in the researcher's allowlist)"
        )
    return load_keypair(config.secret_key_path)


class Node:
    """A node's parts wired together: registry, dispatcher, workers and transport."""

    def __init__(self, config: NodeConfig, *, workers: int = 2) -> None:
        self.config = config
        self.dispatcher = Dispatcher(config.node_id, config.name, DatasetRegistry(config.db_path),
                                     config.disclosure, node_dir=config.directory,
                                     require_approval=config.require_approval,
                                     training_threads=config.training_threads,
                                     training_timeout=config.training_timeout, emit=self._emit,
                                     peer=config.researcher_public_key or INSECURE_PEER,
                                     secure_aggregation=config.secure_aggregation,
                                     force_secure_aggregation=config.force_secure_aggregation,
                                     secure_aggregation_min_nodes=config.secure_aggregation_min_nodes,
                                     privacy=config.privacy)
        self.dispatcher.training.device = config.device  # where its rounds train (docs/gpu.md)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedlab-worker")
        self._train_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedlab-train")
        self._busy = 0
        self._warming = False
        self._busy_lock = threading.Lock()
        self._in_flight = 0  # capped requests (analytics, preprocessing) queued or running
        self._turned_away = 0  # busy replies since the node last had room, for one log line per burst
        self._flight_lock = threading.Lock()
        keys = node_keys(config)
        self.transport = ZmqNodeTransport(
            config.researcher,
            node_id=config.node_id,
            name=config.name,
            heartbeat_interval=config.heartbeat_interval,
            max_message_bytes=config.max_message_bytes,
            state=self.state,
            key=keys,
            server_key=config.researcher_public_key if keys is not None else None,
            bulk=config.bulk_transfer,
        )
        self.audit = AuditLog(config.directory / AUDIT_FILE)
        # Who can have sent a message: with keys, only the researcher holding the key in config.toml
        # (CURVE authenticated it); without, anyone who could reach the researcher's address.
        self._peer = (f"researcher key {config.researcher_public_key}" if config.researcher_public_key
                      else "unauthenticated (insecure mode)")
        self.transport.on_refused = self._refused

    def state(self) -> str:
        return "busy" if self._busy else "online"

    def start(self) -> None:
        self.transport.start(self._on_message)

    def stop(self) -> None:
        self.dispatcher.training.close()  # a running round is cancelled, the training worker stopped
        self.transport.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._train_executor.shutdown(wait=False, cancel_futures=True)
        self.audit.close()

    def _emit(self, envelope: Envelope) -> None:
        """Send a message that is not a reply (a progress event) to the researcher."""
        self.transport.send(envelope)

    def _on_message(self, envelope: Envelope) -> None:
        if envelope.msg_type in _CAPPED_MESSAGES:
            self._capped(envelope)
            return
        if envelope.msg_type in _TRAINING_MESSAGES and not self._warming:
            self._warming = True  # torch is loaded once, at the first sign that training is coming
            self._train_executor.submit(self._warm_up)
        if envelope.msg_type == "train_request":
            self.dispatcher.training.expect(envelope.msg_id)  # cancellable while it waits its turn
            self._train_executor.submit(self._work, envelope)
        else:
            self._executor.submit(self._work, envelope)

    def _capped(self, envelope: Envelope) -> None:
        """Queue an analytics or preprocessing request, or answer ``busy`` if the node has no room.

        Runs on the io thread: it never raises, and refusing costs one small send and one audit line.
        """
        limit = self.config.disclosure.max_concurrent
        first = False
        with self._flight_lock:
            admitted = self._in_flight < limit
            if admitted:
                self._in_flight += 1
            else:
                self._turned_away += 1
                first = self._turned_away == 1
        if not admitted:
            self._refuse_busy(envelope, limit, log_it=first)
            return
        try:
            self._executor.submit(self._capped_work, envelope)
        except Exception:  # the pool is shut down: the node is stopping
            self._landed()
            log.warning("%s %s not handled: the node is stopping", envelope.msg_type, envelope.msg_id)

    def _capped_work(self, envelope: Envelope) -> None:
        try:
            self._work(envelope)
        finally:
            self._landed()

    def _landed(self) -> None:
        """One capped request is done (answered, failed or dropped): make room for the next."""
        with self._flight_lock:
            self._in_flight -= 1
            turned_away, self._turned_away = self._turned_away, 0
        if turned_away > 1:
            log.warning("answered %d more requests busy while at disclosure.max_concurrent", turned_away - 1)

    def _refuse_busy(self, envelope: Envelope, limit: int, *, log_it: bool) -> None:
        """Answer ``busy`` and audit it, from the io thread (never raises into the transport)."""
        try:
            name, node_id = self.config.name, self.config.node_id
            reply = make_envelope(
                ErrorReply(code="busy",
                           message=f"node {name} is already working on {limit} analytics/preprocessing requests, "
                                   f"its maximum (disclosure.max_concurrent = {limit}); retry when they have "
                                   "finished",
                           node=node_id),
                node_id, parent_id=envelope.msg_id)
            if log_it:
                log.warning("%s %s from %s answered busy: %d requests already in flight (disclosure.max_concurrent)",
                            envelope.msg_type, envelope.msg_id, envelope.sender, limit)
            try:
                self.audit.record_reply(envelope, reply, peer=self._peer)  # before it leaves, as in _work
            except Exception:  # pragma: no cover - a failed write only logs, but the io loop must not die
                log.exception("could not audit a busy reply")
            self.transport.send(reply)
        except Exception:  # pragma: no cover - a refusal must never stop the transport
            log.exception("could not send a busy reply to %s", envelope.msg_id)

    def _warm_up(self) -> None:
        """Load torch, first telling the researcher that heartbeats may pause meanwhile.

        Importing torch holds the interpreter for seconds at a time on a loaded machine, so
        the io thread cannot beat; announcing the pause widens the researcher's liveness window
        instead of having it mark a healthy node offline.
        """
        self.transport.announce_pause(_WARM_UP_PAUSE_S)
        try:
            self.dispatcher.training.warm_up()
        finally:
            self.transport.announce_pause(0.0)

    def _refused(self, exc: DecodeError, size: int, n_frames: int) -> None:
        """Audit a message the transport refused before dispatch (never raises into the io loop)."""
        try:
            self.audit.record_refusal(exc.code, str(exc), exc.header, size=size, n_frames=n_frames, peer=self._peer)
        except Exception:  # pragma: no cover - the audit must never stop the transport
            log.exception("could not audit a refused message")

    def _work(self, envelope: Envelope) -> None:
        with self._busy_lock:
            self._busy += 1
        try:
            reply = self.dispatcher.handle(envelope)
            # The audit line is written before the answer leaves, like the ledgers in node.db: a
            # node that dies between the two has logged an answer it may not have sent, never the
            # reverse (and a reader of audit.log who got the reply finds its line there).
            self.audit.record_reply(envelope, reply, peer=self._peer)
            try:
                self.transport.send(reply)
            except FedlabProtocolError as exc:  # the reply itself is too large to send
                reply = make_envelope(
                    ErrorReply(code=exc.code, message=str(exc), node=self.config.node_id),
                    self.config.node_id, parent_id=envelope.msg_id)
                self.audit.record_reply(envelope, reply, peer=self._peer)  # what was sent instead
                self.transport.send(reply)
        finally:
            with self._busy_lock:
                self._busy -= 1


def _setup_logging(config: NodeConfig) -> None:
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s [{config.name}] %(name)s: %(message)s")
    logger = logging.getLogger("fedlab")
    logger.setLevel(config.log_level.upper())
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(config.log_path)):
        handler.setFormatter(fmt)
        logger.addHandler(handler)


def run_node(directory: str | Path, *, researcher: str | None = None,
             heartbeat_interval: float | None = None) -> int:
    """Run the node in ``directory`` in the foreground until SIGINT or SIGTERM; return 0.

    A second process on the same directory is refused before it logs, opens node.db or dials out.
    """
    from fedlab.node.dir_lock import lock_node_dir

    config = load_config(directory)
    with lock_node_dir(config.directory):  # held until this returns, or by the kernel until the process dies
        return _serve(config, researcher, heartbeat_interval)


def _serve(config: NodeConfig, researcher: str | None, heartbeat_interval: float | None) -> int:
    if researcher:
        config = dataclasses.replace(config, researcher=researcher)
    if heartbeat_interval:
        config = dataclasses.replace(config, heartbeat_interval=heartbeat_interval)
    node_keys(config)  # a node that cannot be secured says so before it logs anything
    _setup_logging(config)
    if config.insecure:
        log.warning("%s", INSECURE_WARNING)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    node = Node(config)
    node.start()
    log.info("node %s (%s) started; dialing researcher at %s (%s)", config.name, config.node_id, config.researcher,
             "INSECURE, no encryption" if config.insecure else
             f"encrypted, researcher key {config.researcher_public_key}")
    log.info("%s", describe(config.disclosure))
    while not stop.wait(0.2):
        pass
    node.stop()
    log.info("node %s stopped", config.name)
    return 0
