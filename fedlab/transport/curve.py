"""CURVE on the wire: the researcher's gatekeeper (ZAP) and both sides' handshake watchers.

A refused connection never carries a message: zmq completes (or fails) the CURVE handshake
and the ZAP check before any frame reaches fedlab, so a node that is not allowed, or that was
given the wrong researcher key, cannot have anything it sends processed. What zmq does not
do is say so to a person: it retries silently. This module turns the refusals into one clear,
rate-limited log line on each side, saying what to fix.

- :class:`AllowlistAuthenticator` answers zmq's ZAP requests on the researcher: a client key
  in the :class:`~fedlab.transport.keys.Allowlist` passes, any other is refused and logged
  with the address it came from.
- :class:`HandshakeMonitor` reads a socket's monitor events; :func:`node_refusal` and
  :func:`researcher_refusal` turn a failed handshake into the message for that side.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from fedlab.transport.keys import Allowlist

__all__ = [
    "CONNECTION_EVENTS", "AllowlistAuthenticator", "HandshakeMonitor", "Throttle", "node_refusal", "researcher_refusal",
]

log = logging.getLogger("fedlab.transport")
REPEAT_SECONDS = 60.0  # the same refusal is logged again at most this often (zmq keeps retrying)
_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class Throttle:
    """Says whether a message with a given key may be logged now: once per ``period`` seconds."""

    def __init__(self, period: float = REPEAT_SECONDS) -> None:
        self.period = period
        self._last: dict[str, float] = {}

    def ready(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -self.period) < self.period:
            return False
        self._last[key] = now
        return True


class AllowlistAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP thread, with the allowlist as its CURVE credentials provider.

    pyzmq hands the provider only the client's key; the address it connects from is
    recorded here from the ZAP request (requests are answered one at a time, in order), so
    that a refusal can say where the unknown node is.
    """

    def __init__(self, context: zmq.Context[Any], allowlist: Allowlist) -> None:
        super().__init__(context, log=logging.getLogger("fedlab.transport.zap"))
        self.allowlist = allowlist
        self._address = "an unknown address"
        self._throttle = Throttle()
        self._accepted: set[str] = set()

    def start(self) -> None:
        super().start()
        self.configure_curve_callback("*", credentials_provider=self)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) > 3:
            self._address = msg[3].decode("utf-8", "replace") or "an unknown address"
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by pyzmq for each CURVE client: its Z85 public key; True lets it in."""
        text = key.decode("ascii", "replace")
        name = self.allowlist.name_of(text)
        if name is not None:
            if text not in self._accepted:
                self._accepted.add(text)
                log.info("accepted node key %s (%s) from %s", text, name or "no name in the allowlist",
                         self._address)
            return True
        if self._throttle.ready(text):
            log.warning("refused a node connecting from %s: its public key %s is not in the allowlist %s; "
                        "add it if you trust this node (nothing it sent was read)",
                        self._address, text, self.allowlist.path)
        return False


CONNECTION_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED


class HandshakeMonitor:
    """The monitor socket of ``sock``: handshake results, and with ``connections`` also the
    connection events (accepted, connected, disconnected; their value is the connection's fd).

    libzmq's I/O thread emits these without the GIL, so they stay on time however busy the
    Python side is; they are what liveness is decided from.
    """

    def __init__(self, sock: zmq.Socket[Any], *, connections: bool = False) -> None:
        self._sock = sock
        self.socket = sock.get_monitor_socket(
            _FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED | (CONNECTION_EVENTS if connections else 0))

    def events(self) -> list[tuple[int, int]]:
        """The (event, value) pairs waiting, without blocking."""
        found: list[tuple[int, int]] = []
        while True:
            try:
                message: Any = recv_monitor_message(self.socket, zmq.NOBLOCK)
            except zmq.Again:
                return found
            found.append((int(message["event"]), int(message["value"])))

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:  # the socket is already closed
            pass
        self.socket.close(0)


def _protocol(value: int) -> str:
    return {
        int(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH): "mechanism mismatch",
        int(zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC): "cryptographic error",
    }.get(value, f"protocol error 0x{value:x}")


def node_refusal(event: int, value: int, address: str, *, keyed: bool) -> tuple[str, str] | None:
    """(throttle key, message) for a failed handshake seen by the node; None for a success."""
    if not event & _FAILED:
        return None
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "auth", (
            f"researcher at {address} refused this node's key: it is not in the researcher's allowlist "
            f"(CURVE handshake failed: ZAP status {value}). Send the line printed by `fedlab node key DIR` to "
            "the researcher; this node retries by itself")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        if keyed:
            return "mismatch", (
                f"researcher at {address} does not use encryption (it was started without a key); this node "
                "talks only to the researcher whose public key is in config.toml (CURVE handshake failed: "
                "mechanism mismatch)")
        return "mismatch", (
            f"researcher at {address} requires encrypted, authenticated nodes but this node is insecure; "
            "initialise a node with `fedlab node init DIR --name NAME --researcher-key FILE` "
            "(handshake failed: mechanism mismatch)")
    detail = "no detail" if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL else _protocol(value)
    return "other", (
        f"researcher at {address} refused this node's key or has a different key than config.toml's "
        f"researcher_public_key (CURVE handshake failed: {detail}); check the researcher's public key "
        "with its operator")


def researcher_refusal(event: int, value: int, *, keyed: bool) -> tuple[str, str] | None:
    """(throttle key, message) for a failed handshake seen by the researcher; None when there is
    nothing to add (a success, or a ZAP refusal that the authenticator logged already)."""
    if not event & _FAILED or event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return None
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        if keyed:
            return "mismatch", (
                "refused a node that connects without encryption (an --insecure node, or another program); "
                "this researcher accepts only encrypted nodes in its allowlist (nothing it sent was read)")
        return "mismatch", (
            "refused a node that connects with encryption: this researcher was started without a key "
            "(insecure). Start it with key= and allowlist= (or FEDLAB_KEY and FEDLAB_ALLOWLIST)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
        return "crypto", (
            "refused a node whose CURVE handshake could not be decrypted: it was given a different researcher "
            "public key than this researcher's; give its operator this researcher's NAME.key file "
            "(nothing it sent was read)")
    detail = "no detail" if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL else _protocol(value)
    return "other", (
        f"refused a connection whose handshake failed ({detail}): a node without encryption (--insecure), "
        "a node given another researcher's public key, or a program that does not speak CURVE; nothing it "
        "sent was read" if keyed else
        f"refused a connection whose handshake failed ({detail}); nothing it sent was read")
