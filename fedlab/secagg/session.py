"""The node's state machine of a secure aggregation session (the server's is :mod:`.server_session`).

The protocol is SecAgg (Bonawitz et al., CCS 2017) with the majority threshold that SecAgg+
(Bell et al., CCS 2020) also requires of a complete graph. Every node ``u`` adds to its vector

    PRG(b_u) + sum over the other nodes v of the share step (U2) of +-PRG(s_uv)

where ``b_u`` is a random self-mask seed and ``s_uv`` is derived from the X25519 agreement of
``u``'s and ``v``'s mask keys (``+`` if ``u`` comes before ``v`` in the session's node list, ``-``
otherwise, so the pair cancels in the sum). Before masking, each node Shamir-shares ``b_u`` and its
mask private key among the nodes, sealed for each of them (:mod:`.channel`). After the masked
vectors are in, each surviving node reveals, for each node ``v``, *one* of its two shares: of
``b_v`` if ``v`` survived, of ``v``'s mask key if ``v`` dropped out. The server then rebuilds the
self-masks of the survivors and the pairwise masks between the dropped nodes and the survivors,
and removes them from the sum. It learns the sum and nothing about a single vector.

Threat model: an honest-but-curious server that relays every message. The nodes check what it
claims: the key list contains them with their own keys, no blob opens unless its sender sealed
it for this node in this session, a node makes shares once, masks one vector and answers the
unmasking step for one split of survivors and dropped nodes only. The threshold is a majority, so
that no server can show two disjoint groups of nodes different splits and collect, for one node,
both the share of its self-mask and the share of its mask key from ``threshold`` nodes each.

Pure: no sockets, no files. A node keeps its :class:`NodeSession` as bytes (:meth:`~NodeSession.
to_bytes`, msgspec msgpack, never pickle) between messages and across restarts; a step changes it
only when it succeeds, so a caller that stores it after each step never repeats one. Private
material is forgotten as soon as it is no longer needed (the channel key after the shares are
opened, the self-mask seed and mask key after masking, the unrevealed share of each node after
the unmasking step).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence

import msgspec
import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedlab.errors import FedlabSecaggError
from fedlab.secagg.channel import open_sealed, seal
from fedlab.secagg.prg import LEGACY_PRG, SEED_BYTES, add_masks, check_prg, derive_seed
from fedlab.secagg.shamir import SHARE_BYTES, P, split

__all__ = ["PAIRWISE", "STEPS", "NodeSession", "ShareMessage", "UnmaskAnswer"]

STEPS = ("keys", "shared", "received", "masked", "unmasked")
PAIRWISE = "pairwise mask"  # derive_seed's purpose for the masks between two nodes
_KEY_BYTES = 32
_VERSION = 1

#: one node's answer to the unmasking step: node v -> ("b" or "s", this node's point, the share's value)
UnmaskAnswer = dict[str, tuple[str, int, int]]


class ShareMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a node seals for another node in the share step: its shares at the receiver's point."""

    sender: str
    receiver: str
    session_id: str
    b_share: bytes  # of the sender's self-mask seed, big-endian, SHARE_BYTES long
    s_share: bytes  # of the sender's mask private key


class _Keys(msgspec.Struct, frozen=True, array_like=True):
    c_pk: bytes
    s_pk: bytes


class _Held(msgspec.Struct, frozen=True, array_like=True):
    """The shares a node holds of another node's secrets; one is emptied once the other is revealed."""

    b: bytes
    s: bytes


class _NodeState(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    session_id: str
    node_id: str
    nodes: list[str]
    threshold: int
    step: str
    c_sk: bytes
    s_sk: bytes
    c_pk: bytes
    s_pk: bytes
    b: bytes = b""
    u1: dict[str, _Keys] = {}
    u2: list[str] = []
    held: dict[str, _Held] = {}
    survivors: list[str] = []
    dropped: list[str] = []
    prg: str = LEGACY_PRG  # the mask generator (a session stored before there was a choice: AES-256)


# -- checks shared by both sides -----------------------------------------------------------------
def _check_session(session_id: str, nodes: Sequence[str], threshold: int) -> list[str]:
    if not isinstance(session_id, str) or not session_id:
        raise FedlabSecaggError("a secure aggregation session needs a non-empty session id")
    listed = list(nodes)
    if any(not isinstance(n, str) or not n for n in listed):
        raise FedlabSecaggError("the nodes of a secure aggregation session are non-empty node ids")
    if len(set(listed)) != len(listed):
        repeated = sorted({n for n in listed if listed.count(n) > 1})
        raise FedlabSecaggError(f"session {session_id} lists nodes {repeated} more than once; each node once")
    if len(listed) < 2:
        raise FedlabSecaggError(f"secure aggregation needs at least 2 nodes; session {session_id} has {len(listed)}")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not len(listed) // 2 < threshold <= len(listed):
        raise FedlabSecaggError(
            f"the threshold of session {session_id} must be a majority of its {len(listed)} nodes (from "
            f"{len(listed) // 2 + 1} to {len(listed)}), not {threshold!r}: with fewer, a server could show different "
            "dropout sets to two halves of the nodes and unmask a single node's vector")
    return listed


def _check_split(session_id: str, u2: Sequence[str], threshold: int, survivors: Sequence[str],
                 dropped: Sequence[str]) -> tuple[list[str], list[str]]:
    """``survivors`` and ``dropped`` as lists in session order, if they split ``u2`` exactly."""
    alive, gone = list(survivors), list(dropped)
    for name, group in (("survivors", alive), ("dropped nodes", gone)):
        if len(set(group)) != len(group):
            raise FedlabSecaggError(f"the {name} of session {session_id} name a node more than once: {group}")
    both = set(alive) & set(gone)
    if both:
        raise FedlabSecaggError(f"nodes {sorted(both)} are both survivors and dropped in session {session_id}")
    extra = (set(alive) | set(gone)) - set(u2)
    missing = set(u2) - set(alive) - set(gone)
    if extra or missing:
        raise FedlabSecaggError(
            f"the survivors and dropped nodes of session {session_id} must be exactly the nodes of its share step; "
            f"not of it: {sorted(extra)}, left out: {sorted(missing)}")
    if len(alive) < threshold:
        raise FedlabSecaggError(
            f"{len(alive)} nodes survived in session {session_id}, {threshold} are needed to unmask the sum")
    order = {n: i for i, n in enumerate(u2)}
    return sorted(alive, key=order.__getitem__), sorted(gone, key=order.__getitem__)


def _public(raw: object, what: str) -> X25519PublicKey:
    if not isinstance(raw, bytes) or len(raw) != _KEY_BYTES:
        raise FedlabSecaggError(f"{what} is not a raw {_KEY_BYTES}-byte X25519 public key")
    return X25519PublicKey.from_public_bytes(raw)


def _agree(private: X25519PrivateKey, public: bytes, what: str) -> bytes:
    try:
        return private.exchange(_public(public, what))
    except ValueError:  # a low-order point: the shared secret would be all zeros
        raise FedlabSecaggError(
            f"{what} is a weak X25519 key (it has no shared secret with any key); start a new session") from None


def _y_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def _y_int(raw: bytes, what: str) -> int:
    y = int.from_bytes(raw, "big")
    if len(raw) > SHARE_BYTES or y >= P:
        raise FedlabSecaggError(f"{what} is not a Shamir share (a value below 2**521 - 1)")
    return y


def _names(names: Iterable[str]) -> str:
    return ", ".join(sorted(names))


# -- the node ------------------------------------------------------------------------------------
class NodeSession:
    """One node's side of one session; make it with :meth:`new` or :meth:`from_bytes`."""

    def __init__(self, state: _NodeState) -> None:
        self._st = state
        self._pos = {n: i + 1 for i, n in enumerate(state.nodes)}

    @classmethod
    def new(cls, session_id: str, node_id: str, nodes: Sequence[str], threshold: int,
            prg: str = LEGACY_PRG) -> NodeSession:
        """A session over ``nodes`` (in the server's order: a node's Shamir point is its index + 1),
        with two fresh X25519 key pairs: ``c`` seals the shares, ``s`` agrees the pairwise masks;
        ``prg`` expands the masks (``fedlab.secagg.prg.PRGS``)."""
        listed = _check_session(session_id, nodes, threshold)
        check_prg(prg)
        if node_id not in listed:
            raise FedlabSecaggError(f"session {session_id} does not list this node ({node_id}); it cannot take part")
        c, s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        return cls(_NodeState(
            version=_VERSION, session_id=session_id, node_id=node_id, nodes=listed, threshold=threshold, step="keys",
            c_sk=c.private_bytes_raw(), s_sk=s.private_bytes_raw(), c_pk=c.public_key().public_bytes_raw(),
            s_pk=s.public_key().public_bytes_raw(), prg=prg))

    # -- what it is --------------------------------------------------------------------------
    @property
    def session_id(self) -> str:
        return self._st.session_id

    @property
    def node_id(self) -> str:
        return self._st.node_id

    @property
    def nodes(self) -> list[str]:
        return list(self._st.nodes)

    @property
    def threshold(self) -> int:
        return self._st.threshold

    @property
    def state(self) -> str:
        """The last step taken: "keys", "shared", "received", "masked" or "unmasked"."""
        return self._st.step

    def public_keys(self) -> tuple[bytes, bytes]:
        """This node's raw public keys ``(c_pk, s_pk)`` for the keys step."""
        return self._st.c_pk, self._st.s_pk

    # -- steps -------------------------------------------------------------------------------
    def share(self, keys: Mapping[str, tuple[bytes, bytes]]) -> dict[str, bytes]:
        """The share step: ``keys`` is the server's list U1 of every node's ``(c_pk, s_pk)``; the answer
        is one sealed :class:`ShareMessage` per other node of U1. Once per session."""
        st = self._st
        if st.step != "keys":
            raise FedlabSecaggError(
                f"node {st.node_id} already answered the share step of session {st.session_id}: shares are made "
                "once (a second set, of a new self-mask, would let the server combine the two). Start a new session")
        u1 = self._check_keys(keys)
        c_sk = X25519PrivateKey.from_private_bytes(st.c_sk)
        s_sk = X25519PrivateKey.from_private_bytes(st.s_sk)
        channels = {}
        for v, k in u1.items():
            if v != st.node_id:
                channels[v] = _agree(c_sk, k.c_pk, f"the channel key of node {v}")
                _agree(s_sk, k.s_pk, f"the mask key of node {v}")  # checked now, used when masking
        xs = [self._pos[v] for v in u1]
        b = secrets.token_bytes(SEED_BYTES)
        b_shares = split(b, xs, st.threshold)
        s_shares = split(st.s_sk, xs, st.threshold)
        encoder = msgspec.msgpack.Encoder()
        blobs = {}
        for v, secret in channels.items():
            x = self._pos[v]
            message = ShareMessage(sender=st.node_id, receiver=v, session_id=st.session_id,
                                   b_share=_y_bytes(b_shares[x]), s_share=_y_bytes(s_shares[x]))
            blobs[v] = seal(secret, st.session_id, st.node_id, v, encoder.encode(message))
        own = self._pos[st.node_id]
        st.u1 = u1
        st.b = b
        st.held = {st.node_id: _Held(b=_y_bytes(b_shares[own]), s=_y_bytes(s_shares[own]))}
        st.step = "shared"
        return blobs

    def receive(self, blobs: Mapping[str, bytes]) -> None:
        """The shares the other nodes sealed for this node (their senders and this node are U2). Once."""
        st = self._st
        if st.step != "shared":
            raise FedlabSecaggError(
                f"node {st.node_id} cannot take shares in session {st.session_id} now (it is at step {st.step!r}): "
                "shares are taken once, after the share step. Start a new session")
        senders = list(blobs)
        if st.node_id in senders:
            raise FedlabSecaggError(
                f"session {st.session_id} relays to node {st.node_id} a blob from itself; a node keeps its own "
                "shares. The relay is wrong: start a new session")
        unknown = [v for v in senders if v not in st.u1]
        if unknown:
            raise FedlabSecaggError(
                f"session {st.session_id} relays to node {st.node_id} shares from {_names(unknown)}, which are not "
                "among the nodes of its share step; start a new session")
        if len(senders) + 1 < st.threshold:
            raise FedlabSecaggError(
                f"{len(senders) + 1} nodes took part in the share step of session {st.session_id}, {st.threshold} "
                "are needed to unmask the sum; start a new session when more nodes are up")
        c_sk = X25519PrivateKey.from_private_bytes(st.c_sk)
        decoder = msgspec.msgpack.Decoder(ShareMessage)
        held = dict(st.held)
        for v in senders:
            plain = open_sealed(_agree(c_sk, st.u1[v].c_pk, f"the channel key of node {v}"), st.session_id, v,
                                st.node_id, blobs[v])
            try:
                message = decoder.decode(plain)
            except msgspec.MsgspecError:
                raise FedlabSecaggError(
                    f"the shares node {v} sealed for session {st.session_id} do not decode; start a new session"
                ) from None
            if (message.sender, message.receiver, message.session_id) != (v, st.node_id, st.session_id):
                raise FedlabSecaggError(
                    f"the shares relayed as from node {v} in session {st.session_id} say they are from "
                    f"{message.sender} to {message.receiver} in session {message.session_id}; start a new session")
            _y_int(message.b_share, f"the self-mask share from node {v}")
            _y_int(message.s_share, f"the mask key share from node {v}")
            held[v] = _Held(b=message.b_share, s=message.s_share)
        st.held = held
        st.u2 = [v for v in st.nodes if v in held]
        st.c_sk = b""  # the channel has served its purpose
        st.step = "received"

    def mask(self, vector: np.ndarray) -> None:
        """Mask ``vector`` (1-D uint64, in place) with this node's self-mask and its pairwise masks with
        the other nodes of U2. Once per session: a second vector under the same masks would show the
        server the difference of the two."""
        st = self._st
        if st.step in ("masked", "unmasked"):
            raise FedlabSecaggError(
                f"node {st.node_id} already masked a vector in session {st.session_id}; a session masks one vector "
                "(a second one under the same masks would reveal the difference). Start a new session")
        if st.step != "received":
            raise FedlabSecaggError(
                f"node {st.node_id} has not received the other nodes' shares of session {st.session_id} yet; "
                "it masks only after them")
        if not (isinstance(vector, np.ndarray) and vector.dtype == np.uint64 and vector.ndim == 1
                and vector.flags.c_contiguous and vector.flags.writeable):
            raise FedlabSecaggError("a masked vector is a writeable, C-contiguous 1-D uint64 array; encode it first")
        s_sk = X25519PrivateKey.from_private_bytes(st.s_sk)
        seeds = []
        me = self._pos[st.node_id]
        for v in st.u2:
            if v != st.node_id:
                secret = _agree(s_sk, st.u1[v].s_pk, f"the mask key of node {v}")
                seeds.append((derive_seed(secret, st.session_id, PAIRWISE, st.node_id, v),
                              1 if me < self._pos[v] else -1))
        add_masks(vector, [(st.b, 1), *seeds], prg=st.prg)
        st.b = b""
        st.s_sk = b""
        st.step = "masked"

    def unmask_shares(self, survivors: Sequence[str], dropped: Sequence[str]) -> UnmaskAnswer:
        """The unmasking step: for each survivor v its self-mask share ``("b", x, y)``, for each dropped
        node its mask key share ``("s", x, y)``. Asked again, the same split gets the same answer; any
        other split is refused (that would reveal both secrets of some node)."""
        st = self._st
        if st.step not in ("masked", "unmasked"):
            raise FedlabSecaggError(
                f"node {st.node_id} has not sent a masked vector in session {st.session_id}, so it is no survivor "
                "and does not answer its unmasking step")
        alive, gone = _check_split(st.session_id, st.u2, st.threshold, survivors, dropped)
        if st.node_id not in alive:
            raise FedlabSecaggError(
                f"session {st.session_id} counts node {st.node_id} as dropped, yet asks it to unmask; a dropped "
                "node's mask key must not be rebuilt while it answers. Start a new session")
        if st.step == "unmasked" and (set(alive), set(gone)) != (set(st.survivors), set(st.dropped)):
            raise FedlabSecaggError(
                f"node {st.node_id} already answered the unmasking step of session {st.session_id} for the dropped "
                f"nodes [{_names(st.dropped)}]; it never answers for another split ([{_names(gone)}] now): that "
                "would reveal both the self-mask and the mask key of a node")
        x = self._pos[st.node_id]
        answer: UnmaskAnswer = {}
        for v in st.u2:
            kind = "b" if v in alive else "s"
            raw = st.held[v].b if kind == "b" else st.held[v].s
            answer[v] = (kind, x, _y_int(raw, f"the share held of node {v}"))
        st.held = {v: _Held(b=h.b, s=b"") if v in alive else _Held(b=b"", s=h.s) for v, h in st.held.items()}
        st.survivors, st.dropped = alive, gone
        st.step = "unmasked"
        return answer

    # -- storage -----------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The whole state (private keys included: store it as the node's secrets) as msgpack."""
        return msgspec.msgpack.encode(self._st)

    @classmethod
    def from_bytes(cls, data: bytes) -> NodeSession:
        """A session stored by :meth:`to_bytes`."""
        try:
            state = msgspec.msgpack.decode(data, type=_NodeState)
        except msgspec.MsgspecError as exc:
            raise FedlabSecaggError(f"a stored secure aggregation session does not decode ({exc}); start a new "
                                    "session") from None
        if state.version != _VERSION or state.step not in STEPS:
            raise FedlabSecaggError(
                f"a stored secure aggregation session has version {state.version} at step {state.step!r}, which this "
                "fedlab does not know; start a new session")
        _check_session(state.session_id, state.nodes, state.threshold)
        check_prg(state.prg)
        return cls(state)

    # -- helpers -----------------------------------------------------------------------------
    def _check_keys(self, keys: Mapping[str, tuple[bytes, bytes]]) -> dict[str, _Keys]:
        st = self._st
        unknown = [v for v in keys if v not in self._pos]
        if unknown:
            raise FedlabSecaggError(
                f"the key list of session {st.session_id} names nodes that are not in it: {_names(unknown)}; "
                "start a new session")
        u1 = {}
        for v in st.nodes:
            if v in keys:
                pair = tuple(keys[v])
                if len(pair) != 2:
                    raise FedlabSecaggError(f"node {v}'s keys in session {st.session_id} are not a (c_pk, s_pk) pair")
                _public(pair[0], f"the channel key of node {v}")
                _public(pair[1], f"the mask key of node {v}")
                u1[v] = _Keys(c_pk=pair[0], s_pk=pair[1])
        mine = u1.get(st.node_id)
        if mine is None or (mine.c_pk, mine.s_pk) != (st.c_pk, st.s_pk):
            raise FedlabSecaggError(
                f"the key list of session {st.session_id} does not hold node {st.node_id}'s own keys; the relay is "
                "wrong, start a new session")
        if len(u1) < st.threshold:
            raise FedlabSecaggError(
                f"{len(u1)} nodes answered the keys step of session {st.session_id}, {st.threshold} are needed")
        every = [k for pair in u1.values() for k in (pair.c_pk, pair.s_pk)]
        if len(set(every)) != len(every):
            raise FedlabSecaggError(
                f"the key list of session {st.session_id} repeats a public key; each key is fresh. Start a new session")
        return u1
