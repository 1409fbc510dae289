"""The bulk path's messages on the CURVE channel: asking for a session, the offer, notices.

They travel encrypted and authenticated like every CURVE message, which is what makes the
session secret safe to send in :class:`BulkOffer` and what ties each bulk message to the node
that CURVE authenticated: a message sealed on the bulk connection is delivered only when a
:class:`BulkNotice` for it came over CURVE, and at the notice's place in the CURVE stream, so
the two connections together keep the order a single connection would.

A researcher that does not know these types answers ``bulk_request`` with an
``unknown_type`` error, and the node then keeps to CURVE alone: older peers are unaffected.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from fedlab.protocol.messages import Message, register

__all__ = ["BULK_VERSION", "BulkNotice", "BulkOffer", "BulkRequest"]

BULK_VERSION = 1
_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_SessionId = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]


class BulkRequest(Message, frozen=True):
    """Node to researcher, on each new CURVE connection: "I can use the bulk path"."""

    version: Annotated[int, msgspec.Meta(ge=1, le=1000)] = BULK_VERSION


class BulkOffer(Message, frozen=True):
    """Researcher to node, the reply to a :class:`BulkRequest`: a fresh session.

    ``secret`` and ``session_id`` give both sides the keys (``bulk_seal.SessionKeys.derive``);
    ``port`` is where the node dials, on the researcher's host as the node knows it; messages
    of at least ``threshold`` bytes go that way, in records of ``chunk_bytes``.
    """

    session_id: _SessionId
    secret: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    threshold: Annotated[int, msgspec.Meta(ge=0)]
    chunk_bytes: Annotated[int, msgspec.Meta(ge=4096, le=16 << 20)]
    version: Annotated[int, msgspec.Meta(ge=1, le=1000)] = BULK_VERSION


class BulkNotice(Message, frozen=True):
    """Either way: message ``msg_id`` (answering ``parent_id``, if a reply) comes sealed on the
    bulk connection of ``session_id``; deliver it here in the order of this connection."""

    session_id: _SessionId
    msg_id: _Id
    size: Annotated[int, msgspec.Meta(ge=0)]
    parent_id: _Id | None = None


register("bulk_request", BulkRequest)
register("bulk_offer", BulkOffer)
register("bulk_notice", BulkNotice)
