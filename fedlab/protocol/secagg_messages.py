"""Wire types of secure aggregation: the steps a session goes through, one request type per step.

A session sums one vector per node so that the researcher learns only the sum (see
SECURITY.md, "Secure aggregation", and :mod:`fedlab.secagg.session`):

1. ``secagg_keys_request`` -> each node makes two X25519 key pairs for this session and answers
   their public halves (``SecaggKeysReply``);
2. ``secagg_share_request`` carries every node's public keys -> each node answers its Shamir
   shares, sealed for each other node (``SecaggShareReply``: opaque blobs the researcher relays);
3. the request that produces the data (``TrainRequest.secagg`` or ``FARequest.secagg``) carries
   ``SecaggInput``: the blobs addressed to that node and how to encode the vector; the node answers
   its vector masked;
4. ``secagg_unmask_request`` names who sent a masked vector (survivors) and who did not (dropped)
   -> each survivor answers the shares that let the researcher remove the masks of the sum, and
   only of the sum (``SecaggUnmaskReply``).

This module imports neither numpy nor ``cryptography``: it only says what the messages hold.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from fedlab.protocol.messages import Message, register

__all__ = [
    "PURPOSES",
    "SecaggField",
    "SecaggInput",
    "SecaggKeys",
    "SecaggKeysReply",
    "SecaggKeysRequest",
    "SecaggShare",
    "SecaggShareReply",
    "SecaggShareRequest",
    "SecaggUnmaskReply",
    "SecaggUnmaskRequest",
]

PURPOSES = ("training", "analytics")
SessionId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
NodeId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
PublicKey = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
# a sealed share: nonce + two Shamir shares of 66 bytes + names; 4 KiB is far more than it needs
Blob = Annotated[bytes, msgspec.Meta(min_length=1, max_length=4096)]
NodeList = Annotated[list[NodeId], msgspec.Meta(min_length=2, max_length=1000)]


class SecaggKeys(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A node's two public keys for one session: ``c_pk`` seals shares, ``s_pk`` agrees masks."""

    c_pk: PublicKey
    s_pk: PublicKey


class SecaggKeysRequest(Message, frozen=True):
    """Step 1: start session ``session_id`` over ``nodes`` (in this order: a node's Shamir point is
    its position + 1); the sum can be unmasked while at least ``threshold`` of them answer."""

    session_id: SessionId
    nodes: NodeList
    threshold: Annotated[int, msgspec.Meta(ge=2, le=1000)]
    purpose: Annotated[str, msgspec.Meta(min_length=1, max_length=32)] = "training"
    #: the mask generator (``fedlab.secagg.prg.PRGS``). Absent (an older researcher): AES-256-CTR, as
    #: before; an older node refuses the field, so it never masks with another generator than the rest
    prg: Annotated[str, msgspec.Meta(min_length=1, max_length=32)] = "aes-256-ctr"


class SecaggKeysReply(Message, frozen=True):
    session_id: SessionId
    keys: SecaggKeys


class SecaggShareRequest(Message, frozen=True):
    """Step 2: every node that answered step 1, with its keys."""

    session_id: SessionId
    keys: dict[NodeId, SecaggKeys]


class SecaggShareReply(Message, frozen=True):
    """The node's shares, one sealed blob per other node (only that node can open it)."""

    session_id: SessionId
    blobs: dict[NodeId, Blob]


class SecaggField(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One array of a training reply in the masked vector, in order.

    ``group`` is ``""`` for the model's parameters, else an aux var group (``"scaffold"``). The
    node writes ``round(clip(x * scale) * 2**frac_bits)`` with ``scale = n_samples / weight_bound``
    when ``weighted`` (FedAvg's weights), else ``scale = 1``; ``lanes`` values per 64-bit word: 1,
    or 2 in 32-bit lanes (``fedlab.secagg.fixed_point.encode_into``). ``lanes`` is sent only when
    it is 2, so a node without lanes refuses such a field (an unknown field) instead of answering
    a vector in another layout.
    """

    group: Annotated[str, msgspec.Meta(max_length=256)]
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    size: Annotated[int, msgspec.Meta(ge=0)]
    weighted: bool
    clip: Annotated[float, msgspec.Meta(gt=0, le=2.0**40)]
    frac_bits: Annotated[int, msgspec.Meta(ge=16, le=62)]
    lanes: Annotated[int, msgspec.Meta(ge=1, le=2)] = 1


class SecaggInput(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Step 3, inside the request that makes the data: the shares sealed for this node by the others
    (their senders are the nodes whose masks it adds) and, for training, how to encode.

    After its fields the training vector has three exact integers: the node's ``n_samples``, 1 (it
    contributed) and how many values it clipped; each is summed like the rest.
    """

    session_id: SessionId
    blobs: dict[NodeId, Blob]
    fields: list[SecaggField] = []
    weight_bound: Annotated[int, msgspec.Meta(ge=0)] = 0


class SecaggUnmaskRequest(Message, frozen=True):
    """Step 4: whose masked vectors are in the sum (``survivors``) and who dropped out after step 2."""

    session_id: SessionId
    survivors: list[NodeId]
    dropped: list[NodeId] = []


class SecaggShare(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A Shamir share of node v's self-mask seed (``kind`` "b", v survived) or of its mask key ("s",
    v dropped): the point ``x`` and the value ``y`` (big-endian bytes; the field is 2**521 - 1)."""

    kind: Annotated[str, msgspec.Meta(pattern="^[bs]$")]
    x: Annotated[int, msgspec.Meta(ge=1, le=1000)]
    y: Annotated[bytes, msgspec.Meta(max_length=66)]


class SecaggUnmaskReply(Message, frozen=True):
    session_id: SessionId
    shares: dict[NodeId, SecaggShare]


_TYPES: dict[str, type[Message]] = {
    "secagg_keys_request": SecaggKeysRequest,
    "secagg_keys_reply": SecaggKeysReply,
    "secagg_share_request": SecaggShareRequest,
    "secagg_share_reply": SecaggShareReply,
    "secagg_unmask_request": SecaggUnmaskRequest,
    "secagg_unmask_reply": SecaggUnmaskReply,
}
for _name, _cls in _TYPES.items():
    register(_name, _cls)
