"""Shamir secret sharing over the prime field of p = 2**521 - 1.

Each node shares its self-mask seed and its mask private key (32 bytes each) with the other
nodes of a session, so that the server can rebuild, from any ``threshold`` answers, exactly the
secrets it needs to remove the masks of the nodes that dropped out, and no secret from fewer.
A Mersenne prime of 521 bits holds any secret of up to 64 bytes as one field element, so one
polynomial per secret is enough; pure Python integers are fast enough at these sizes (a share is
one evaluation of a degree ``threshold - 1`` polynomial).

Any ``threshold - 1`` shares are uniformly distributed whatever the secret (the coefficients
come from :func:`secrets.randbelow`), so they say nothing about it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from fedlab.errors import FedlabSecaggError

__all__ = ["MAX_SECRET_BYTES", "P", "SHARE_BYTES", "combine", "lagrange_at_zero", "split"]

P = 2**521 - 1
MAX_SECRET_BYTES = 64  # 512 bits < 521
SHARE_BYTES = 66  # a field element as big-endian bytes


def _check_xs(xs: Sequence[int]) -> list[int]:
    points = list(xs)
    for x in points:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 < x < P:
            raise FedlabSecaggError(f"a Shamir share's point is a positive integer below 2**521 - 1, not {x!r}")
    if len(set(points)) != len(points):
        raise FedlabSecaggError(f"Shamir share points must be distinct; got {sorted(points)}")
    return points


def split(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` at the points ``xs``, any ``threshold`` of which rebuild it.

    ``f`` is a random polynomial of degree ``threshold - 1`` with ``f(0)`` the secret read as a
    big-endian integer."""
    if not isinstance(secret, bytes | bytearray) or len(secret) > MAX_SECRET_BYTES:
        raise FedlabSecaggError(f"a Shamir secret is at most {MAX_SECRET_BYTES} bytes")
    points = _check_xs(xs)
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= len(points):
        raise FedlabSecaggError(
            f"a Shamir threshold is between 1 and the number of shares ({len(points)}), not {threshold!r}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(P) for _ in range(threshold - 1)]
    shares = {}
    for x in points:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % P
        shares[x] = y
    return shares


def lagrange_at_zero(xs: Sequence[int]) -> dict[int, int]:
    """The Lagrange coefficients ``{x_i: l_i(0)}`` of the points ``xs``: ``f(0) = sum l_i(0) f(x_i)``.

    They depend only on the points, so a caller rebuilding many secrets from the same answering
    nodes computes them once."""
    points = _check_xs(xs)
    coefficients = {}
    for i, xi in enumerate(points):
        numerator = 1
        denominator = 1
        for j, xj in enumerate(points):
            if i != j:
                numerator = numerator * xj % P
                denominator = denominator * (xj - xi) % P
        coefficients[xi] = numerator * pow(denominator, -1, P) % P
    return coefficients


def combine(shares: Mapping[int, int], threshold: int, length: int, *,
            coefficients: Mapping[int, int] | None = None) -> bytes:
    """The secret of ``length`` bytes rebuilt from ``threshold`` of ``shares`` (the lowest points).

    ``coefficients``, from :func:`lagrange_at_zero` of exactly those points, saves recomputing
    them. Refused with fewer than ``threshold`` shares, or if the rebuilt value does not fit in
    ``length`` bytes (shares of different secrets, or forged: a wrong combination is a random
    field element, which fits in 32 bytes with probability 2**-265)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise FedlabSecaggError(f"a Shamir threshold is a positive integer, not {threshold!r}")
    if len(shares) < threshold:
        raise FedlabSecaggError(
            f"{len(shares)} Shamir shares were given, {threshold} are needed to rebuild the secret")
    if not 0 <= length <= MAX_SECRET_BYTES:
        raise FedlabSecaggError(f"a Shamir secret is at most {MAX_SECRET_BYTES} bytes, not {length}")
    chosen = sorted(_check_xs(list(shares)))[:threshold]
    if coefficients is None or sorted(coefficients) != chosen:
        coefficients = lagrange_at_zero(chosen)
    value = 0
    for x in chosen:
        y = shares[x]
        if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < P:
            raise FedlabSecaggError(f"the Shamir share at point {x} is not a field element below 2**521 - 1")
        value = (value + coefficients[x] * y) % P
    if value >= 1 << (8 * length):
        raise FedlabSecaggError(
            f"the Shamir shares do not rebuild a {length}-byte secret: they are shares of different secrets, "
            "or some were altered; ask the nodes again")
    return value.to_bytes(length, "big")
