"""Ring encodings (fedlab.secagg.fixed_point) and masks (fedlab.secagg.prg)."""

from __future__ import annotations

import math
import secrets
import tracemalloc
from fractions import Fraction

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlab.errors import FedlabSecaggError
from fedlab.secagg import fixed_point
from fedlab.secagg.fixed_point import (
    decode_exact_sum,
    decode_int,
    decode_sum,
    encode_exact,
    encode_int,
    encode_into,
    frac_bits_for,
)
from fedlab.secagg.prg import CHUNK_BYTES, add_mask, derive_seed, mask_stream


def _cancelling_masks(n_nodes: int, size: int) -> list[np.ndarray]:
    """One mask per node, pairwise as in SecAgg: node i adds +m_ij for j > i and -m_ij for j < i."""
    masks = [np.zeros(size, np.uint64) for _ in range(n_nodes)]
    for i in range(n_nodes):
        for j in range(i + 1, n_nodes):
            seed = secrets.token_bytes(32)
            add_mask(masks[i], seed, 1)
            add_mask(masks[j], seed, -1)
    return masks


# -- prg ---------------------------------------------------------------------------------------
def test_mask_is_the_aes_ctr_keystream_as_little_endian_words() -> None:
    seed = bytes(range(32))
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    expected = np.frombuffer(encryptor.update(bytes(8 * 1000)), dtype="<u8")
    assert np.array_equal(mask_stream(seed, 1000), expected)


def test_mask_across_chunks_matches_one_stream_and_cancels() -> None:
    seed = secrets.token_bytes(32)
    n = CHUNK_BYTES // 8 + 3  # one full chunk and a partial one
    stream = mask_stream(seed, n)
    assert np.array_equal(stream[:10], mask_stream(seed, 10))
    target = np.arange(n, dtype=np.uint64)
    add_mask(target, seed, 1)
    assert np.array_equal(target, np.arange(n, dtype=np.uint64) + stream)
    add_mask(target, seed, -1)
    assert np.array_equal(target, np.arange(n, dtype=np.uint64))


def test_different_seeds_give_unrelated_masks() -> None:
    a, b = mask_stream(secrets.token_bytes(32), 4096), mask_stream(secrets.token_bytes(32), 4096)
    assert np.count_nonzero(a == b) == 0
    # roughly uniform: the mean of the top bit is about 1/2
    assert abs(float(np.mean(a >> np.uint64(63))) - 0.5) < 0.05


def test_add_mask_uses_bounded_memory() -> None:
    target = np.zeros(8 * CHUNK_BYTES // 8, np.uint64)  # 32 MiB
    tracemalloc.start()
    try:
        add_mask(target, secrets.token_bytes(32), 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * CHUNK_BYTES


def test_add_mask_refuses_what_it_cannot_mask_in_place() -> None:
    seed = secrets.token_bytes(32)
    with pytest.raises(FedlabSecaggError, match="uint64"):
        add_mask(np.zeros(4, np.int64), seed, 1)
    with pytest.raises(FedlabSecaggError, match="C-contiguous"):
        add_mask(np.zeros(8, np.uint64)[::2], seed, 1)
    with pytest.raises(FedlabSecaggError, match="sign"):
        add_mask(np.zeros(4, np.uint64), seed, 2)
    with pytest.raises(FedlabSecaggError, match="32 bytes"):
        add_mask(np.zeros(4, np.uint64), seed[:16], 1)


def test_derive_seed_is_symmetric_and_bound_to_its_context() -> None:
    secret = secrets.token_bytes(32)
    seed = derive_seed(secret, "s1", "mask", "alice", "bob")
    assert len(seed) == 32
    assert seed == derive_seed(secret, "s1", "mask", "bob", "alice")
    others = {derive_seed(secret, "s2", "mask", "alice", "bob"), derive_seed(secret, "s1", "other", "alice", "bob"),
              derive_seed(secret, "s1", "mask", "alice", "carol"), derive_seed(secrets.token_bytes(32), "s1", "mask",
                                                                               "alice", "bob")}
    assert seed not in others and len(others) == 4
    # no ambiguity in how the parts are joined
    assert derive_seed(secret, "s1", "ab", "c", "d") != derive_seed(secret, "s1a", "b", "c", "d")


# -- training vectors --------------------------------------------------------------------------
def test_frac_bits_for() -> None:
    assert frac_bits_for(8, 2.0**12) == 62 - 3 - 12
    assert frac_bits_for(5, 3.0) == 62 - 3 - 2
    assert frac_bits_for(1, 1.0) == 62
    assert frac_bits_for(2, 2.0**-20) == 62  # capped
    with pytest.raises(FedlabSecaggError, match="clip range or the node count is too large"):
        frac_bits_for(1000, 2.0**40)
    with pytest.raises(FedlabSecaggError):
        frac_bits_for(0, 1.0)


def test_masked_encodings_sum_to_the_plain_sum() -> None:
    rng = np.random.default_rng(1)
    n_nodes, size, clip = 5, 2000, 8.0
    fb = frac_bits_for(n_nodes, clip)
    values = [rng.normal(0, 2, size) for _ in range(n_nodes)]
    total = np.zeros(size, np.uint64)
    for value, mask in zip(values, _cancelling_masks(n_nodes, size), strict=True):
        vector = np.zeros(size, np.uint64)
        assert encode_into(vector, value, scale=1.0, clip=clip, frac_bits=fb) == 0
        vector += mask
        total += vector
    got = decode_sum(total, fb)
    exact = np.array([math.fsum(v[i] for v in values) for i in range(size)])
    assert np.max(np.abs(got - exact)) <= n_nodes * 2.0 ** -(fb + 1) + 4 * np.finfo(float).eps * clip * n_nodes


def test_encoding_is_within_half_a_unit_and_handles_negatives() -> None:
    fb = 20
    values = np.array([-3.25, -1e-9, 0.0, 1.0 / 3.0, 2.5, -7.999])
    out = np.zeros(values.size, np.uint64)
    encode_into(out, values, scale=1.0, clip=8.0, frac_bits=fb)
    signed = out.view(np.int64)
    assert signed[0] == -3.25 * 2**fb
    assert np.all(np.abs(signed * 2.0**-fb - values) <= 2.0 ** -(fb + 1))
    assert np.allclose(decode_sum(out, fb), values, atol=2.0 ** -(fb + 1), rtol=0)


def test_clipping_is_counted_and_nan_encodes_as_zero() -> None:
    values = np.array([1.0, 5.0, -5.0, np.nan, np.inf, -np.inf, 3.9], dtype=np.float32)
    out = np.zeros(values.size, np.uint64)
    assert encode_into(out, values, scale=1.0, clip=4.0, frac_bits=30) == 5
    assert decode_sum(out, 30).tolist() == [1.0, 4.0, -4.0, 0.0, 4.0, -4.0, pytest.approx(3.9, abs=1e-6)]


def test_scale_applies_before_the_clip() -> None:
    out = np.zeros(3, np.uint64)
    assert encode_into(out, np.array([10, 20, -40]), scale=0.1, clip=3.0, frac_bits=40) == 1
    assert decode_sum(out, 40).tolist() == pytest.approx([1.0, 2.0, -3.0], abs=2.0**-40)


def test_any_shape_and_layout_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fixed_point, "_CHUNK", 7)
    rng = np.random.default_rng(2)
    values = rng.normal(size=(13, 11)).T  # not C-contiguous: read flat in C order, chunk by chunk
    out = np.zeros(values.size, np.uint64)
    encode_into(out, values, scale=1.0, clip=8.0, frac_bits=40)
    assert np.allclose(decode_sum(out, 40), values.ravel(), atol=2.0**-41, rtol=0)
    into = np.empty(values.size)
    assert decode_sum(out, 40, out=into) is into
    assert np.array_equal(into, decode_sum(out, 40))


def test_encode_into_a_slice_of_a_longer_vector() -> None:
    vector = np.zeros(10, np.uint64)
    encode_into(vector[3:6], np.array([1.0, -1.0, 0.5]), scale=1.0, clip=2.0, frac_bits=16)
    assert vector[:3].tolist() == [0, 0, 0] and vector[6:].tolist() == [0] * 4
    assert decode_sum(vector[3:6], 16).tolist() == [1.0, -1.0, 0.5]


def test_encode_into_uses_bounded_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fixed_point, "_CHUNK", 1 << 14)
    values = np.random.default_rng(3).normal(size=1 << 21).astype(np.float32)  # 8 MiB; 16 MiB as float64
    out = np.zeros(values.size, np.uint64)
    tracemalloc.start()
    try:
        encode_into(out, values, scale=0.5, clip=4.0, frac_bits=40)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_encode_into_refusals() -> None:
    with pytest.raises(FedlabSecaggError, match="complex"):
        encode_into(np.zeros(2, np.uint64), np.array([1j, 2j]), scale=1.0, clip=1.0, frac_bits=20)
    with pytest.raises(FedlabSecaggError, match="do not fit"):
        encode_into(np.zeros(3, np.uint64), np.zeros(2), scale=1.0, clip=1.0, frac_bits=20)
    with pytest.raises(FedlabSecaggError, match="fraction bits"):
        encode_into(np.zeros(2, np.uint64), np.zeros(2), scale=1.0, clip=4.0, frac_bits=61)


def test_exact_integers_in_the_ring() -> None:
    for value in (0, 1, -1, 12345, -(2**63), 2**63 - 1):
        assert decode_int(encode_int(value)) == value
    total = np.array([encode_int(v) for v in (5, -7, 1000)], np.uint64).sum(dtype=np.uint64)
    assert decode_int(int(total)) == 998
    with pytest.raises(FedlabSecaggError):
        encode_int(2**63)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(-100, 100), min_size=4, max_size=4), min_size=1, max_size=6))
def test_property_training_sums(rows: list[list[float]]) -> None:
    fb = frac_bits_for(len(rows), 128.0)
    total = np.zeros(4, np.uint64)
    for row, mask in zip(rows, _cancelling_masks(len(rows), 4), strict=True):
        vector = np.zeros(4, np.uint64)
        encode_into(vector, np.array(row), scale=1.0, clip=128.0, frac_bits=fb)
        total += vector + mask
    exact = [math.fsum(r[i] for r in rows) for i in range(4)]
    assert np.allclose(decode_sum(total, fb), exact, rtol=0, atol=len(rows) * 2.0 ** -(fb + 1) + 1e-12)


# -- exact analytics values --------------------------------------------------------------------
def test_exact_sums_of_masked_encodings() -> None:
    nodes = [[3, -5, 0.1, -2.5, 2**100], [4, 10, 0.2, 1e-3, -(2**100)], [-1, -1, 0.3, 7.25, 1]]
    total = np.zeros(len(nodes[0]) * 8, np.uint64)
    for values, mask in zip(nodes, _cancelling_masks(len(nodes), total.size), strict=True):
        total += encode_exact(values) + mask
    sums = decode_exact_sum(total, len(nodes[0]))
    assert sums[0] == 6 and sums[1] == 4 and sums[4] == 1
    assert all(isinstance(s, Fraction) for s in sums)
    for i in (2, 3):  # the exact sum of the floats' binary values
        assert sums[i] == sum(Fraction(row[i]) for row in nodes)
        assert float(sums[i]) == math.fsum(row[i] for row in nodes)


def test_exact_rounding_below_the_fraction_bits() -> None:
    [v] = decode_exact_sum(encode_exact([2.0**-70 * 3], frac_bits=64), 1)
    assert v == 0  # 3 * 2**-70 rounds to the nearest multiple of 2**-64
    [v] = decode_exact_sum(encode_exact([1.5 * 2**-64 + 2**-66], frac_bits=64), 1)
    assert v == Fraction(2, 2**64)
    [v] = decode_exact_sum(encode_exact([7], limbs=4, frac_bits=0), 1, limbs=4, frac_bits=0)
    assert v == 7


def test_exact_limbs_never_carry_into_each_other() -> None:
    encoded = encode_exact([-1, 2**120])
    assert encoded.size == 16 and int(encoded.max()) < 2**32
    # 2**32 copies of -1 summed limb by limb fit in uint64 slots
    total = encoded[:8] * np.uint64(2**32 - 1)
    assert decode_exact_sum(total, 1) == [-(2**32 - 1)]


def test_exact_refusals() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(FedlabSecaggError, match="finite"):
            encode_exact([1.0, bad])
    with pytest.raises(FedlabSecaggError, match="too large"):
        encode_exact([2.0**152])
    encode_exact([2.0**151])
    with pytest.raises(FedlabSecaggError, match="uint64 values"):
        decode_exact_sum(np.zeros(7, np.uint64), 1)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.one_of(st.integers(-(2**80), 2**80), st.floats(-1e30, 1e30)), min_size=3, max_size=3),
                min_size=1, max_size=5))
def test_property_exact_sums(rows: list[list[float | int]]) -> None:
    total = np.zeros(3 * 8, np.uint64)
    for row, mask in zip(rows, _cancelling_masks(len(rows), total.size), strict=True):
        total += encode_exact(row) + mask
    got = decode_exact_sum(total, 3)
    for i in range(3):
        expected = sum(round(Fraction(r[i]) * 2**64) for r in rows)
        assert got[i] == Fraction(expected, 2**64)
        if all(isinstance(r[i], int) for r in rows):
            assert got[i] == sum(r[i] for r in rows)
