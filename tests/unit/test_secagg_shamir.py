"""Shamir secret sharing over 2**521 - 1 (fedlab.secagg.shamir)."""

from __future__ import annotations

import itertools
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlab.errors import FedlabSecaggError
from fedlab.secagg.shamir import P, combine, lagrange_at_zero, split


def test_any_threshold_of_the_shares_rebuild_the_secret() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, [1, 2, 3, 4, 5], 3)
    for subset in itertools.combinations(shares, 3):
        assert combine({x: shares[x] for x in subset}, 3, 32) == secret
    assert combine(shares, 3, 32) == secret  # more than needed: fine


def test_fewer_than_threshold_shares_are_refused() -> None:
    shares = split(b"\x07" * 32, [1, 2, 3, 4, 5], 3)
    with pytest.raises(FedlabSecaggError, match="2 Shamir shares were given, 3 are needed"):
        combine({1: shares[1], 2: shares[2]}, 3, 32)


def test_threshold_minus_one_shares_with_a_forged_one_give_another_value() -> None:
    secret = secrets.token_bytes(32)
    for _ in range(20):
        shares = split(secret, [1, 2, 3, 4, 5], 3)
        forged = {1: shares[1], 2: shares[2], 3: secrets.randbelow(P)}
        try:
            assert combine(forged, 3, 32) != secret
        except FedlabSecaggError:
            pass  # the forged value is not even 32 bytes long: the usual case


def test_threshold_minus_one_shares_fit_every_secret() -> None:
    """t-1 shares are consistent with any secret: for each candidate there is a t-th share that
    completes them to it, so they carry no information about which one it is."""
    secret = secrets.token_bytes(32)
    shares = split(secret, [1, 2, 3, 4], 3)
    known = {1: shares[1], 2: shares[2]}
    coefficients = lagrange_at_zero([1, 2, 3])
    for _ in range(5):
        other = secrets.token_bytes(32)
        partial = sum(coefficients[x] * y for x, y in known.items()) % P
        y3 = (int.from_bytes(other, "big") - partial) * pow(coefficients[3], -1, P) % P
        assert combine({**known, 3: y3}, 3, 32) == other


def test_shares_are_fresh_each_time() -> None:
    a = split(b"same", [1, 2, 3], 2)
    b = split(b"same", [1, 2, 3], 2)
    assert a != b
    assert combine(a, 2, 4) == combine(b, 2, 4) == b"same"


@pytest.mark.parametrize("xs", [[1, 2, 2], [0, 1, 2], [1, 2, P], [-1, 2, 3]])
def test_bad_points_are_refused(xs: list[int]) -> None:
    with pytest.raises(FedlabSecaggError):
        split(b"secret", xs, 2)


def test_bad_thresholds_and_secrets_are_refused() -> None:
    with pytest.raises(FedlabSecaggError, match="threshold"):
        split(b"secret", [1, 2, 3], 4)
    with pytest.raises(FedlabSecaggError, match="threshold"):
        split(b"secret", [1, 2, 3], 0)
    with pytest.raises(FedlabSecaggError, match="at most 64 bytes"):
        split(bytes(65), [1, 2, 3], 2)
    with pytest.raises(FedlabSecaggError, match="field element"):
        combine({1: P, 2: 5}, 2, 32)


def test_a_secret_too_long_for_the_length_is_refused() -> None:
    shares = split(b"\xff" * 40, [1, 2, 3], 2)
    with pytest.raises(FedlabSecaggError, match="32-byte secret"):
        combine(shares, 2, 32)


def test_precomputed_coefficients_give_the_same_secret() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, [3, 5, 8, 9], 3)
    coefficients = lagrange_at_zero([3, 5, 8])
    assert combine(shares, 3, 32, coefficients=coefficients) == secret
    # coefficients of other points are ignored, not trusted
    assert combine(shares, 3, 32, coefficients=lagrange_at_zero([5, 8, 9])) == secret


@settings(max_examples=60, deadline=None)
@given(secret=st.binary(max_size=64), n=st.integers(1, 8), data=st.data())
def test_property_any_threshold_subset_rebuilds(secret: bytes, n: int, data: st.DataObject) -> None:
    threshold = data.draw(st.integers(1, n))
    xs = data.draw(st.lists(st.integers(1, 2**64), min_size=n, max_size=n, unique=True))
    shares = split(secret, xs, threshold)
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=threshold, max_size=n, unique=True))
    assert combine({x: shares[x] for x in subset}, threshold, len(secret)) == secret
