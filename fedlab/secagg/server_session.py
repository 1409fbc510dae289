"""The server's state machine of a secure aggregation session: it collects, relays and unmasks.

The server (the researcher) holds public keys, sealed shares it cannot open and masked vectors;
after the unmasking step it rebuilds, from ``threshold`` nodes' shares, the self-masks of the
survivors and the mask keys of the nodes that dropped out, and removes exactly the masks of the
sum. The protocol and its threat model are in :mod:`.session`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedlab.errors import FedlabSecaggError
from fedlab.secagg.prg import LEGACY_PRG, SEED_BYTES, add_masks, check_prg, derive_seed
from fedlab.secagg.session import PAIRWISE, _agree, _check_session, _check_split, _Keys, _names, _public
from fedlab.secagg.shamir import combine, lagrange_at_zero

__all__ = ["ServerSession"]

class ServerSession:
    """The server's side of one session: collects keys and sealed shares, relays them, unmasks the sum.

    ``keys()`` closes the keys step (U1) and the first ``blobs_for()`` closes the share step (U2):
    after them, every node sees the same lists."""

    def __init__(self, session_id: str, nodes: Sequence[str], threshold: int, prg: str = LEGACY_PRG) -> None:
        self.nodes = _check_session(session_id, nodes, threshold)
        self.prg = check_prg(prg)
        self.session_id = session_id
        self.threshold = threshold
        self._pos = {n: i + 1 for i, n in enumerate(self.nodes)}
        self._keys: dict[str, _Keys] = {}
        self._u1: list[str] | None = None
        self._blobs: dict[str, dict[str, bytes]] = {}
        self._u2: list[str] | None = None

    def add_keys(self, node_id: str, c_pk: bytes, s_pk: bytes) -> None:
        """A node's answer to the keys step."""
        if node_id not in self._pos:
            raise FedlabSecaggError(f"node {node_id} is not in secure aggregation session {self.session_id}")
        if self._u1 is not None:
            raise FedlabSecaggError(f"the keys step of session {self.session_id} is closed; node {node_id} is late")
        if node_id in self._keys:
            raise FedlabSecaggError(f"node {node_id} already sent its keys for session {self.session_id}")
        _public(c_pk, f"the channel key of node {node_id}")
        _public(s_pk, f"the mask key of node {node_id}")
        seen = {k for pair in self._keys.values() for k in (pair.c_pk, pair.s_pk)}
        if c_pk == s_pk or c_pk in seen or s_pk in seen:
            raise FedlabSecaggError(f"node {node_id} sent a public key already in session {self.session_id}")
        self._keys[node_id] = _Keys(c_pk=c_pk, s_pk=s_pk)

    def keys(self) -> dict[str, tuple[bytes, bytes]]:
        """U1: every node's keys, in session order, for the share step (closes the keys step)."""
        if self._u1 is None:
            if len(self._keys) < self.threshold:
                raise FedlabSecaggError(
                    f"{len(self._keys)} nodes answered the keys step of session {self.session_id}, {self.threshold} "
                    "are needed")
            self._u1 = [n for n in self.nodes if n in self._keys]
        return {n: (self._keys[n].c_pk, self._keys[n].s_pk) for n in self._u1}

    def add_shares(self, sender: str, blobs: Mapping[str, bytes]) -> None:
        """A node's answer to the share step: one sealed blob for every other node of U1."""
        if self._u1 is None:
            raise FedlabSecaggError(f"the share step of session {self.session_id} starts with keys()")
        if sender not in self._u1:
            raise FedlabSecaggError(f"node {sender} is not among the nodes of the keys step of {self.session_id}")
        if self._u2 is not None:
            raise FedlabSecaggError(f"the share step of session {self.session_id} is closed; node {sender} is late")
        if sender in self._blobs:
            raise FedlabSecaggError(f"node {sender} already sent its shares for session {self.session_id}")
        expected = set(self._u1) - {sender}
        outside = set(blobs) - expected
        missing = expected - set(blobs)
        if outside or missing:
            raise FedlabSecaggError(
                f"node {sender}'s shares for session {self.session_id} must be for the other nodes of the keys step; "
                f"for others: [{_names(outside)}], missing: [{_names(missing)}]")
        if any(not isinstance(b, bytes) or not b for b in blobs.values()):
            raise FedlabSecaggError(f"node {sender}'s shares for session {self.session_id} hold an empty blob")
        self._blobs[sender] = dict(blobs)

    def blobs_for(self, node_id: str) -> dict[str, bytes]:
        """The blobs sealed for ``node_id`` by every other node of U2 (closes the share step)."""
        u2 = self._close_shares()
        if node_id not in u2:
            raise FedlabSecaggError(
                f"node {node_id} did not take part in the share step of session {self.session_id}; it cannot mask")
        return {v: self._blobs[v][node_id] for v in u2 if v != node_id}

    def unmask(self, masked_sum: np.ndarray, survivors: Sequence[str], dropped: Sequence[str],
               answers: Mapping[str, Mapping[str, tuple[str, int, int]]]) -> np.ndarray:
        """The sum of the survivors' vectors, from ``masked_sum`` (the uint64 sum of their masked vectors)
        and the ``answers`` of at least ``threshold`` survivors to the unmasking step.

        Works in place: ``masked_sum`` is unmasked and returned (nothing the size of the vector is
        allocated). It is left untouched when the answers are refused."""
        u2 = self._close_shares()
        if not (isinstance(masked_sum, np.ndarray) and masked_sum.dtype == np.uint64 and masked_sum.ndim == 1
                and masked_sum.flags.c_contiguous and masked_sum.flags.writeable):
            raise FedlabSecaggError("the masked sum is a writeable, C-contiguous 1-D uint64 array")
        alive, gone = _check_split(self.session_id, u2, self.threshold, survivors, dropped)
        strangers = [n for n in answers if n not in alive]
        if strangers:
            raise FedlabSecaggError(
                f"nodes {_names(strangers)} answered the unmasking step of session {self.session_id} but are no "
                "survivors; only survivors answer")
        if len(answers) < self.threshold:
            raise FedlabSecaggError(
                f"{len(answers)} nodes answered the unmasking step, {self.threshold} are needed (session "
                f"{self.session_id}); the sum cannot be unmasked: run the round again")
        answering = [n for n in alive if n in answers][: self.threshold]
        for n in answering:
            self._check_answer(n, answers[n], alive, gone)
        xs = [self._pos[n] for n in answering]
        coefficients = lagrange_at_zero(xs)

        def rebuild(v: str) -> bytes:
            try:
                return combine({self._pos[n]: answers[n][v][2] for n in answering}, self.threshold, SEED_BYTES,
                               coefficients=coefficients)
            except FedlabSecaggError as exc:
                raise FedlabSecaggError(f"the secret of node {v} in session {self.session_id}: {exc}") from None

        self_masks = [rebuild(u) for u in alive]
        pairwise = []
        for d in gone:
            s_sk = X25519PrivateKey.from_private_bytes(rebuild(d))
            if s_sk.public_key().public_bytes_raw() != self._keys[d].s_pk:
                raise FedlabSecaggError(
                    f"the mask key of dropped node {d} rebuilt from the shares of session {self.session_id} does not "
                    "match the public key it sent: some shares are wrong. The sum cannot be unmasked; run the round "
                    "again")
            for u in alive:
                secret = _agree(s_sk, self._keys[u].s_pk, f"the mask key of node {u}")
                sign = 1 if self._pos[u] < self._pos[d] else -1  # what u added for the pair (u, d)
                pairwise.append((derive_seed(secret, self.session_id, PAIRWISE, d, u), -sign))
        add_masks(masked_sum, [*((seed, -1) for seed in self_masks), *pairwise], prg=self.prg)
        return masked_sum

    # -- helpers -----------------------------------------------------------------------------
    def _close_shares(self) -> list[str]:
        if self._u2 is None:
            if self._u1 is None:
                raise FedlabSecaggError(f"session {self.session_id} has not had its keys step (keys())")
            if len(self._blobs) < self.threshold:
                raise FedlabSecaggError(
                    f"{len(self._blobs)} nodes answered the share step of session {self.session_id}, "
                    f"{self.threshold} are needed")
            self._u2 = [n for n in self._u1 if n in self._blobs]
        return self._u2

    def _check_answer(self, node: str, answer: Mapping[str, tuple[str, int, int]], alive: list[str],
                      gone: list[str]) -> None:
        if set(answer) != set(alive) | set(gone):
            raise FedlabSecaggError(
                f"node {node}'s answer to the unmasking step of session {self.session_id} is not for exactly the "
                "nodes of the share step")
        for v, share in answer.items():
            kind, x, y = share
            wanted = "b" if v in alive else "s"
            if kind != wanted or x != self._pos[node] or isinstance(y, bool) or not isinstance(y, int):
                raise FedlabSecaggError(
                    f"node {node}'s share of node {v} in session {self.session_id} is ({kind!r}, {x!r}, ...); "
                    f"expected kind {wanted!r} at its point {self._pos[node]}")
