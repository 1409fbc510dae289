"""The researcher's side of one secure aggregation session: set it up, relay, unmask the sum.

``SecureSum`` runs the steps of :mod:`fedlab.protocol.secagg_messages` through ``Requests``, like any
job: the keys step and the share step before the data request, the unmasking step after it. Each
step waits at most ``timeout`` seconds. A node that fails or is silent in a step leaves the session
and is named in ``left`` with the reason; while at least ``threshold`` nodes remain, the session
goes on, and the masks of nodes that drop out after the share step are removed with the others'
shares. Below the threshold it stops with a ``FedlabSecaggError`` that says how many nodes answered
and how many were needed.

The researcher holds only what the nodes send: public keys, sealed shares it cannot open, masked
vectors and, at the end, the shares that remove the masks of the sum; never a node's vector unmasked.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from fedlab.errors import FedlabSecaggError
from fedlab.protocol import Message
from fedlab.protocol.secagg_messages import (
    SecaggInput,
    SecaggKeys,
    SecaggKeysReply,
    SecaggKeysRequest,
    SecaggShareReply,
    SecaggShareRequest,
    SecaggUnmaskReply,
    SecaggUnmaskRequest,
)
from fedlab.researcher.policies import DiscardOnTimeout
from fedlab.researcher.requests import MessagesByNode, Requests
from fedlab.secagg.prg import PRG
from fedlab.secagg.server_session import ServerSession

__all__ = ["SecureSum", "default_threshold"]

log = logging.getLogger("fedlab.researcher")
R = TypeVar("R")


def default_threshold(n_nodes: int) -> int:
    """A majority of the nodes (at least 2): the fewest the nodes accept (see ``NodeSession.new``)."""
    return max(2, n_nodes // 2 + 1)


class SecureSum:
    """One session over ``nodes`` for ``purpose`` ("training" or "analytics")."""

    def __init__(self, requests: Requests, nodes: Sequence[str], *, purpose: str, threshold: int | None = None,
                 timeout: float = 30.0, session_id: str | None = None) -> None:
        self.requests = requests
        self.nodes = list(nodes)
        if len(self.nodes) < 2:
            raise FedlabSecaggError(f"secure aggregation needs at least 2 nodes; {len(self.nodes)} were found. "
                                    "Ask without secagg, or wait for more nodes")
        self.purpose = purpose
        self.threshold = default_threshold(len(self.nodes)) if threshold is None else int(threshold)
        if not len(self.nodes) // 2 < self.threshold <= len(self.nodes):
            raise FedlabSecaggError(
                f"the secure aggregation threshold must be a majority of the {len(self.nodes)} nodes "
                f"(from {len(self.nodes) // 2 + 1} to {len(self.nodes)}), not {self.threshold}")
        self.timeout = float(timeout)
        self.session_id = session_id or "sa-" + uuid.uuid4().hex
        self.server = ServerSession(self.session_id, self.nodes, self.threshold, PRG)
        self.ready: list[str] = []  # the nodes through the share step, in session order
        self.left: dict[str, str] = {}  # node -> why it left the session

    # -- steps 1 and 2 -----------------------------------------------------------------------
    def setup(self) -> list[str]:
        """Run the keys and share steps; return the nodes that may send a masked vector."""
        replies = self._ask({n: SecaggKeysRequest(session_id=self.session_id, nodes=self.nodes,
                                                  threshold=self.threshold, purpose=self.purpose, prg=PRG)
                             for n in self.nodes}, SecaggKeysReply, "keys")
        for node_id, reply in replies.items():
            self.server.add_keys(node_id, reply.keys.c_pk, reply.keys.s_pk)
        self._need(list(replies), "the keys step")
        keys = {n: SecaggKeys(c_pk=c, s_pk=s) for n, (c, s) in self.server.keys().items()}
        shares = self._ask({n: SecaggShareRequest(session_id=self.session_id, keys=keys) for n in keys},
                           SecaggShareReply, "share")
        for node_id, share in shares.items():
            self.server.add_shares(node_id, dict(share.blobs))
        self.ready = [n for n in self.nodes if n in shares]
        self._need(self.ready, "the share step")
        return list(self.ready)

    def input_for(self, node_id: str, **encoding: Any) -> SecaggInput:
        """What the data request to ``node_id`` carries: the shares sealed for it, and ``encoding``
        (the training fields and weight bound)."""
        return SecaggInput(session_id=self.session_id, blobs=self.server.blobs_for(node_id), **encoding)

    # -- step 4 ------------------------------------------------------------------------------
    def unmask(self, masked_sum: np.ndarray, survivors: Sequence[str], why: Mapping[str, str] | None = None
               ) -> np.ndarray:
        """The sum of the survivors' vectors, from the sum of their masked vectors (uint64); ``why`` says,
        for nodes whose masked vector did not come, what happened to them (for the error below t)."""
        survivors = [n for n in self.ready if n in set(survivors)]
        for node_id in self.ready:
            if node_id not in survivors:
                self._leave(node_id, f"masked input step: {(why or {}).get(node_id, 'no masked vector came')}")
        self._need(survivors, "the masked input step")
        dropped = [n for n in self.ready if n not in set(survivors)]
        replies = self._ask({n: SecaggUnmaskRequest(session_id=self.session_id, survivors=survivors, dropped=dropped)
                             for n in survivors}, SecaggUnmaskReply, "unmask")
        self._need(list(replies), "the unmasking step")
        answers = {n: {v: (s.kind, s.x, int.from_bytes(s.y, "big")) for v, s in r.shares.items()}
                   for n, r in replies.items()}
        if dropped:
            log.warning("secure aggregation %s: %s dropped out after the share step; their masks were removed",
                        self.session_id, dropped)
        return self.server.unmask(masked_sum, survivors, dropped, answers)

    # -- helpers -----------------------------------------------------------------------------
    def _ask(self, messages: Mapping[str, Message], reply_type: type[R], step: str) -> dict[str, R]:
        nodes = list(messages)
        with self.requests.send(MessagesByNode(messages), nodes, [DiscardOnTimeout(self.timeout)]) as request:
            replies: dict[str, R] = {n: e.content for n, e in request.replies().items()
                                     if isinstance(e.content, reply_type)}
            for node_id, error in request.errors().items():
                self._leave(node_id, f"{step} step: [{error.code}] {error.message}")
            for node_id, why in request.missing().items():
                self._leave(node_id, f"{step} step: {why.reason}: {why.detail}")
        return replies

    def _leave(self, node_id: str, why: str) -> None:
        log.warning("node %s left secure aggregation session %s: %s", node_id, self.session_id, why)
        self.left.setdefault(node_id, why)

    def _need(self, nodes: Sequence[str], step: str) -> None:
        if len(nodes) >= self.threshold:
            return
        why = "; ".join(f"{n}: {w}" for n, w in self.left.items()) or "no reason given"
        raise FedlabSecaggError(
            f"secure aggregation stopped at {step}: {len(nodes)} of {len(self.nodes)} nodes answered, {self.threshold} "
            f"are needed to unmask the sum ({why})")
