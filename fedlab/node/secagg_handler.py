"""The node's side of secure aggregation: the session steps, masking its vectors, and its own rules.

The node decides, from its config and its stored sessions, whatever the request claims:

* ``secure_aggregation = false`` in config.toml: it takes no part in sessions;
* ``force_secure_aggregation = true``: it answers analytics and training rounds only masked
  (:meth:`SecaggHandler.require`);
* a session needs at least ``min_nodes`` nodes and a majority threshold (checked by
  :class:`~fedlab.secagg.session.NodeSession`), runs each step once, masks one vector, and answers
  the unmasking step for one split of survivors and dropped nodes only; every step is committed to
  ``node.db`` before its answer leaves (:mod:`fedlab.node.secagg_state`).

What a masked vector holds is decided elsewhere (the training reply, the analytics partials, both
after the node's disclosure rules); here it is only masked.
"""

from __future__ import annotations

import logging

import numpy as np

from fedlab.errors import FedlabSecaggError
from fedlab.node.secagg_state import SecaggStore
from fedlab.protocol import Envelope
from fedlab.protocol.secagg_messages import (
    PURPOSES,
    SecaggInput,
    SecaggKeys,
    SecaggKeysReply,
    SecaggKeysRequest,
    SecaggShare,
    SecaggShareReply,
    SecaggShareRequest,
    SecaggUnmaskReply,
    SecaggUnmaskRequest,
)
from fedlab.secagg.session import NodeSession

__all__ = ["SecaggHandler"]

log = logging.getLogger("fedlab.node")
_Y_BYTES = 66  # a share's value in the field 2**521 - 1


class SecaggHandler:
    """Secure aggregation messages for one node; ``peer`` is who may ask (the researcher's key)."""

    def __init__(self, store: SecaggStore, *, node_id: str, name: str, peer: str, enabled: bool = True,
                 forced: bool = False, min_nodes: int = 2) -> None:
        self.store = store
        self.node_id = node_id
        self.name = name
        self.peer = peer
        self.enabled = enabled
        self.forced = forced
        self.min_nodes = min_nodes

    # -- the node's rules --------------------------------------------------------------------
    def require(self, secure: bool, what: str) -> None:
        """Refuse ``what`` in the clear on a node that forces secure aggregation, or masked on one that
        takes no part in it."""
        if secure and not self.enabled:
            raise FedlabSecaggError(
                f"node {self.name} does not take part in secure aggregation (secure_aggregation = false in its "
                f"config.toml); ask for {what} without secagg, or ask its operator to enable it")
        if not secure and self.forced:
            raise FedlabSecaggError(
                f"node {self.name} answers {what} only under secure aggregation (force_secure_aggregation = true in "
                "its config.toml): ask again with secagg=True (`%fed ... --secagg`)")

    # -- steps 1, 2 and 4 --------------------------------------------------------------------
    def keys_request(self, envelope: Envelope) -> SecaggKeysReply:
        request = envelope.content
        assert isinstance(request, SecaggKeysRequest)
        self.require(True, "secure aggregation")
        if request.purpose not in PURPOSES:
            raise FedlabSecaggError(f"unknown secure aggregation purpose {request.purpose!r}; one of {PURPOSES}")
        if len(request.nodes) < self.min_nodes:
            raise FedlabSecaggError(
                f"node {self.name} takes part in secure aggregation over at least {self.min_nodes} nodes "
                f"(secure_aggregation_min_nodes in its config.toml); this session has {len(request.nodes)}")
        session = NodeSession.new(request.session_id, self.node_id, list(request.nodes), request.threshold,
                                  prg=request.prg)
        self.store.create(self.peer, session, request.purpose)
        c_pk, s_pk = session.public_keys()
        log.info("secure aggregation session %s (%s) started: %d nodes, threshold %d", request.session_id,
                 request.purpose, len(request.nodes), request.threshold)
        return SecaggKeysReply(session_id=request.session_id, keys=SecaggKeys(c_pk=c_pk, s_pk=s_pk))

    def share_request(self, envelope: Envelope) -> SecaggShareReply:
        request = envelope.content
        assert isinstance(request, SecaggShareRequest)
        self.require(True, "secure aggregation")
        with self.store.session(self.peer, request.session_id) as session:
            blobs = session.share({n: (k.c_pk, k.s_pk) for n, k in request.keys.items()})
        return SecaggShareReply(session_id=request.session_id, blobs=blobs)

    def unmask_request(self, envelope: Envelope) -> SecaggUnmaskReply:
        request = envelope.content
        assert isinstance(request, SecaggUnmaskRequest)
        self.require(True, "secure aggregation")
        with self.store.session(self.peer, request.session_id) as session:
            answer = session.unmask_shares(list(request.survivors), list(request.dropped))
        log.info("secure aggregation session %s unmasked: %d survivors, %d dropped %s", request.session_id,
                 len(request.survivors), len(request.dropped), sorted(request.dropped))
        return SecaggUnmaskReply(session_id=request.session_id, shares={
            v: SecaggShare(kind=kind, x=x, y=y.to_bytes(_Y_BYTES, "big")) for v, (kind, x, y) in answer.items()})

    # -- step 3 ------------------------------------------------------------------------------
    def mask(self, secagg: SecaggInput, vector: np.ndarray, purpose: str) -> None:
        """Mask ``vector`` (uint64, in place) for ``secagg``'s session, once: the shares addressed to
        this node are opened and kept, and the session is marked masked, in one transaction."""
        self.require(True, purpose)
        with self.store.session(self.peer, secagg.session_id, purpose) as session:
            session.receive(dict(secagg.blobs))
            session.mask(vector)
