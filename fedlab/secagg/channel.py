"""Sealed node-to-node messages, relayed by the server that must not read or alter them.

Nodes never talk to each other directly: a node's Shamir shares for node ``v`` go through the
server, sealed with a key only the two nodes can derive (HKDF-SHA256 of their X25519 channel
secret, bound to the session). AES-256-GCM with a random 96-bit nonce authenticates the blob and
its context: the associated data names the session, the sender and the receiver in that order,
so a blob does not open in another session (a replay), for another receiver, or in the other
direction (the server handing a's blob for b back to a as if b had sent it).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlab.errors import FedlabSecaggError
from fedlab.secagg.prg import DOMAIN, bind

__all__ = ["NONCE_BYTES", "OVERHEAD", "open_sealed", "seal"]

NONCE_BYTES = 12
_TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + _TAG_BYTES  # a blob is this much longer than its plaintext


def _key(shared_secret: bytes, session_id: str, a: str, b: str) -> AESGCM:
    if not isinstance(shared_secret, bytes | bytearray) or len(shared_secret) != 32:
        raise FedlabSecaggError("a sealed channel is keyed by a 32-byte X25519 shared secret; got something else")
    first, second = sorted((a, b))
    info = bind(DOMAIN + " channel", session_id, first, second)
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(bytes(shared_secret))
    return AESGCM(key)


def _aad(session_id: str, sender: str, receiver: str) -> bytes:
    return bind(DOMAIN + " sealed", session_id, sender, receiver)


def seal(shared_secret: bytes, session_id: str, sender: str, receiver: str, plaintext: bytes) -> bytes:
    """``plaintext`` sealed from ``sender`` to ``receiver`` in ``session_id``: nonce + ciphertext + tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + _key(shared_secret, session_id, sender, receiver).encrypt(
        nonce, plaintext, _aad(session_id, sender, receiver))


def open_sealed(shared_secret: bytes, session_id: str, sender: str, receiver: str, blob: bytes) -> bytes:
    """The plaintext of a blob :func:`seal` made with the same arguments; anything else is refused."""
    aead = _key(shared_secret, session_id, sender, receiver)
    if not isinstance(blob, bytes | bytearray) or len(blob) < OVERHEAD:
        raise FedlabSecaggError(
            f"the shares sealed by node {sender} for secure aggregation session {session_id} are truncated "
            f"({len(blob) if isinstance(blob, bytes | bytearray) else 'no'} bytes); start a new session")
    try:
        return aead.decrypt(bytes(blob[:NONCE_BYTES]), bytes(blob[NONCE_BYTES:]), _aad(session_id, sender, receiver))
    except InvalidTag:
        raise FedlabSecaggError(
            f"the shares sealed by node {sender} for secure aggregation session {session_id} do not open: they were "
            "altered, replayed from another session, addressed to another node or sealed with other keys. Start a "
            "new session; if it happens again, the relay between the nodes is not to be trusted") from None
