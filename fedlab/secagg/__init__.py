"""Secure aggregation: the server learns the sum of the nodes' vectors, not any single vector.

The pure building blocks (no sockets, no storage), after SecAgg (Bonawitz et al. 2017) and
SecAgg+ (Bell et al. 2020):

- :mod:`.fixed_point`: numbers as elements of the ring Z_(2**64), so that sums are exact uint64 sums;
- :mod:`.prg`: masks expanded from 32-byte seeds (AES-256-CTR) and added in place, modulo 2**64;
- :mod:`.shamir`: Shamir secret sharing over the field of 2**521 - 1;
- :mod:`.channel`: node-to-node messages sealed for the receiver (AES-256-GCM), relayed by the server;
- :mod:`.session`: the node's and the server's state machines of one session.

The node's and the researcher's message handling (:mod:`fedlab.node.secagg_handler`,
:mod:`fedlab.researcher.secure_sum`) drive these.
"""

from __future__ import annotations

from fedlab.secagg.channel import open_sealed, seal
from fedlab.secagg.fixed_point import (
    decode_exact_sum,
    decode_int,
    decode_sum,
    encode_exact,
    encode_int,
    encode_into,
    frac_bits_for,
)
from fedlab.secagg.prg import add_mask, derive_seed, mask_stream
from fedlab.secagg.server_session import ServerSession
from fedlab.secagg.session import NodeSession
from fedlab.secagg.shamir import combine, split

__all__ = [
    "NodeSession",
    "ServerSession",
    "add_mask",
    "combine",
    "decode_exact_sum",
    "decode_int",
    "decode_sum",
    "derive_seed",
    "encode_exact",
    "encode_int",
    "encode_into",
    "frac_bits_for",
    "mask_stream",
    "open_sealed",
    "seal",
    "split",
]
